// Error reporting for the Carrara core: one exception type carrying a stable code.
#pragma once

#include <stdexcept>
#include <string>

namespace carrara::core {

// Stable numeric codes; the Python binding maps each to one exception class
// (see cpp/_native.cpp::raise_for_code). Append only: the numbers are part of the ABI.
enum class ErrorCode : int {
  kOk = 0,
  kInvalidArgument = 1,
  kNotFound = 2,
  kDecode = 3,
  kResourceExhausted = 4,
  kFailedPrecondition = 5,
  kInternal = 6,
  kCancelled = 7,
  kDeadlineExceeded = 8,
  kUnavailable = 9,
};

inline constexpr int kErrorCodeCount = 10;

const char* error_code_name(ErrorCode code) noexcept;

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message)
      : std::runtime_error(message), code_(code) {}
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

}  // namespace carrara::core
