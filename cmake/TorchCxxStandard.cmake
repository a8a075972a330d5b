# deepseek_ext_torch_cxx_standard(<out-var> <TorchConfig.cmake> <torch include dirs>...)
# Sets <out-var> to the C++ standard of the torch found: the one its CMake config
# declares (CXX_STANDARD or cxx_std_NN: 17 for torch 2.11, 20 from 2.12, as
# torch's BuildExtension uses) and at least the one ATen/ATen.h's __cplusplus
# check requires. setup.py applies the same rule, so the Python extension and
# the CMake library compile with one standard, host and CUDA code alike.
# As a script: cmake -DTORCH_CONFIG=<.../TorchConfig.cmake> -DTORCH_INCLUDE_DIRS=<dir> -P TorchCxxStandard.cmake
function(deepseek_ext_torch_cxx_standard out_var torch_config)
  set(_found "")
  file(STRINGS "${torch_config}" _lines REGEX "CXX_STANDARD [0-9]+|cxx_std_[0-9]+")
  foreach(_line IN LISTS _lines)
    string(REGEX MATCHALL "(CXX_STANDARD |cxx_std_)[0-9]+" _matches "${_line}")
    foreach(_m IN LISTS _matches)
      string(REGEX MATCH "[0-9]+$" _n "${_m}")
      list(APPEND _found ${_n})
    endforeach()
  endforeach()
  foreach(_dir IN LISTS ARGN)
    if(EXISTS "${_dir}/ATen/ATen.h")
      file(STRINGS "${_dir}/ATen/ATen.h" _check REGEX "__cplusplus < 20[0-9][0-9][0-9][0-9]L")
      if(_check MATCHES "__cplusplus < 20([0-9][0-9])[0-9][0-9]L")
        list(APPEND _found ${CMAKE_MATCH_1})
      endif()
      break()
    endif()
  endforeach()
  if(NOT _found)
    message(FATAL_ERROR "deepseek_ext: cannot tell which C++ standard torch uses: "
                        "neither ${torch_config} nor ATen/ATen.h says")
  endif()
  list(SORT _found COMPARE NATURAL ORDER DESCENDING)
  list(GET _found 0 _std)
  set(${out_var} ${_std} PARENT_SCOPE)
endfunction()

if(CMAKE_SCRIPT_MODE_FILE STREQUAL CMAKE_CURRENT_LIST_FILE)
  deepseek_ext_torch_cxx_standard(_std "${TORCH_CONFIG}" ${TORCH_INCLUDE_DIRS})
  message(STATUS "C++${_std}")
endif()
