// Engine error codes as gRPC status codes: the one mapping every native front uses.
#pragma once

#include <grpcpp/support/status.h>

#include "carrara/core/error.hpp"
#include "carrara/core/executor.hpp"

namespace carrara::server {

// kInvalidArgument/kDecode -> INVALID_ARGUMENT, kNotFound -> NOT_FOUND,
// kResourceExhausted -> RESOURCE_EXHAUSTED, kFailedPrecondition -> FAILED_PRECONDITION,
// kDeadlineExceeded -> DEADLINE_EXCEEDED, kUnavailable -> UNAVAILABLE, kCancelled -> CANCELLED,
// kOk -> OK, anything else -> INTERNAL.
grpc::StatusCode grpc_code(core::ErrorCode code) noexcept;

// The status a failed core::Status is answered with (message passed through).
grpc::Status grpc_status(const core::Status& status);

}  // namespace carrara::server
