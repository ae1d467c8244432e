// FeatureStore: the online store as the serving engine sees it (raw keys -> values).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "carrara/core/error.hpp"

namespace carrara::core {

// The online store as the serving engine needs it: raw keys -> values in one round trip.
class FeatureStore {
 public:
  virtual ~FeatureStore() = default;
  // Fills out[i] with the value of keys[i] (nullopt = absent). Must return by `deadline_ns`
  // (a steady_clock time_point in ns since its epoch, i.e.
  // std::chrono::steady_clock::now().time_since_epoch() in ns); throws
  // carrara::core::Error(ErrorCode::kUnavailable or kDeadlineExceeded, message) on
  // failure/timeout. Thread-safe: called concurrently from many threads.
  virtual void mget(std::span<const std::string> keys, std::vector<std::optional<std::string>>& out,
                    std::int64_t deadline_ns) = 0;
};

}  // namespace carrara::core
