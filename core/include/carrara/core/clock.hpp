// Time source for TTLs; injectable so tests can move time by hand.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>

#if defined(__linux__)
#include <time.h>
#endif

namespace carrara::core {

class Clock {
 public:
  virtual ~Clock() = default;
  // Monotonic nanoseconds; only differences are meaningful.
  virtual std::int64_t now_ns() const noexcept = 0;
};

// Monotonic time for TTLs. On Linux it reads CLOCK_MONOTONIC_COARSE (a few ns instead of
// ~30 ns, resolution one scheduler tick, 1-4 ms): cache TTLs are seconds, so a hit does
// not need a precise clock. Elsewhere it is std::chrono::steady_clock.
class SteadyClock final : public Clock {
 public:
  std::int64_t now_ns() const noexcept override {
#if defined(__linux__)
    timespec ts{};
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return static_cast<std::int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
#else
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
#endif
  }
};

// A clock that only moves when told to: for TTL tests.
class ManualClock final : public Clock {
 public:
  explicit ManualClock(std::int64_t start_ns = 0) : now_(start_ns) {}
  std::int64_t now_ns() const noexcept override { return now_.load(std::memory_order_acquire); }
  void set_ns(std::int64_t t) noexcept { now_.store(t, std::memory_order_release); }
  void advance_ns(std::int64_t d) noexcept { now_.fetch_add(d, std::memory_order_acq_rel); }

 private:
  std::atomic<std::int64_t> now_;
};

// The process-wide steady clock, shared by caches built without an explicit clock.
std::shared_ptr<Clock> steady_clock();

}  // namespace carrara::core
