// Helpers shared by the core tests.
#pragma once

#include <gtest/gtest.h>

#include <initializer_list>
#include <string>
#include <string_view>

#include "carrara/core/error.hpp"

namespace carrara::core::testing {

// Runs `fn`, expects it to throw carrara::core::Error with `code` and a message containing
// every one of `parts`; returns the message (empty when the expectation failed).
template <class Fn>
std::string expect_error(Fn&& fn, ErrorCode code, std::initializer_list<std::string_view> parts = {}) {
  try {
    fn();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << "message: " << e.what();
    const std::string msg = e.what();
    for (std::string_view p : parts) {
      EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
    }
    return msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw a non-carrara exception: " << e.what();
    return {};
  }
  ADD_FAILURE() << "did not throw; expected " << error_code_name(code);
  return {};
}

}  // namespace carrara::core::testing
