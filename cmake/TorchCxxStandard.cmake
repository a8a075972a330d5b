# deepseek_ext_torch_cxx_standard(<out-var> <torch include dirs>)
# Sets <out-var> to the C++ standard (17, 20, ...) that torch's headers require:
# ATen/ATen.h stops with #error when __cplusplus is below it (201703L: 17,
# 202002L: 20). setup.py reads the same line, so the Python extension and the
# CMake library compile with the same standard, host and CUDA code alike.
# Also usable as a script: cmake -DTORCH_INCLUDE_DIRS=<dir> -P TorchCxxStandard.cmake
function(deepseek_ext_torch_cxx_standard out_var)
  foreach(_dir IN LISTS ARGN)
    if(EXISTS "${_dir}/ATen/ATen.h")
      file(STRINGS "${_dir}/ATen/ATen.h" _check REGEX "__cplusplus < 20[0-9][0-9][0-9][0-9]L")
      if(_check MATCHES "__cplusplus < 20([0-9][0-9])[0-9][0-9]L")
        set(_year "${CMAKE_MATCH_1}")
        if(_year STREQUAL "17")
          set(${out_var} 17 PARENT_SCOPE)
        elseif(_year STREQUAL "20")
          set(${out_var} 20 PARENT_SCOPE)
        elseif(_year STREQUAL "23")
          set(${out_var} 23 PARENT_SCOPE)
        else()
          message(FATAL_ERROR "deepseek_ext: unknown C++ standard year 20${_year} in ${_dir}/ATen/ATen.h")
        endif()
        return()
      endif()
      message(FATAL_ERROR "deepseek_ext: cannot tell which C++ standard torch needs: no __cplusplus check in ${_dir}/ATen/ATen.h")
    endif()
  endforeach()
  message(FATAL_ERROR "deepseek_ext: ATen/ATen.h not found in torch's include dirs (${ARGN})")
endfunction()

if(CMAKE_SCRIPT_MODE_FILE STREQUAL CMAKE_CURRENT_LIST_FILE)
  deepseek_ext_torch_cxx_standard(_std ${TORCH_INCLUDE_DIRS})
  message(STATUS "C++${_std}")
endif()
