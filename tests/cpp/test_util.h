#pragma once
// Helpers shared by the GoogleTest files.

#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <string>

namespace deepseek_ext {
namespace testing {

// fn() must throw a c10::Error whose message contains `needle`.
template <typename Fn>
void expect_error(Fn&& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no error, expected: " << needle;
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

}  // namespace testing
}  // namespace deepseek_ext
