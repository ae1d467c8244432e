// Executors: where an assembled float32 [n, d] matrix becomes predictions, asynchronously.
//
// The engine hands every variant's rows to an Executor and is called back when they are done.
// Two kinds exist: DynamicBatcher (queues requests and calls a synchronous batch function once
// per batch: the Python binding implements that function for in-process models, taking the GIL
// once per batch) and remote executors such as the Triton gRPC client (server/).
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "carrara/core/error.hpp"

namespace carrara::core {

// The outcome of an asynchronous call (no exceptions across threads).
struct Status {
  ErrorCode code = ErrorCode::kOk;
  std::string message;

  bool ok() const noexcept { return code == ErrorCode::kOk; }
  static Status Ok() { return {}; }
  static Status From(const Error& e) { return {e.code(), e.what()}; }
};

// A row-major float32 matrix.
struct Matrix {
  std::vector<float> data;
  std::size_t rows = 0;
  std::size_t cols = 0;

  Matrix() = default;
  Matrix(std::size_t r, std::size_t c) : data(r * c), rows(r), cols(c) {}
  float* row(std::size_t i) noexcept { return data.data() + i * cols; }
  const float* row(std::size_t i) const noexcept { return data.data() + i * cols; }
};

using InferDone = std::function<void(Status, Matrix)>;

class Executor {
 public:
  virtual ~Executor() = default;
  virtual std::size_t input_dim() const = 0;
  virtual std::size_t output_dim() const = 0;
  // Runs x [n, input_dim()] and calls `done` exactly once, on any thread, possibly before
  // infer returns. The output must be [n, output_dim()].
  virtual void infer(Matrix x, InferDone done) = 0;
  // Stops taking work; queued work completes with kUnavailable. Idempotent; blocks until the
  // executor's own threads have stopped.
  virtual void close() {}
  // True when the work runs in this process (no network to wait on).
  virtual bool in_process() const { return false; }
};

// A synchronous batch function: x [n, d] -> out [n, k]. Called by one batcher worker at a time
// per worker; returns a Status instead of throwing.
using BatchFn = std::function<Status(const Matrix& x, Matrix& out)>;

struct BatcherOptions {
  std::size_t max_batch_size = 64;      // rows per call; a request larger than this runs alone
  std::int64_t max_queue_delay_ns = 0;  // wait this long for more work once one request waits
  std::size_t workers = 1;              // threads calling the batch function
  std::size_t max_queued_rows = 1 << 16;  // past it infer() answers kResourceExhausted
  bool in_process = true;
};

struct BatcherStats {
  std::uint64_t batches = 0;
  std::uint64_t requests = 0;
  std::uint64_t rows = 0;
  std::size_t queued_rows = 0;
};

// Triton-style dynamic batcher: requests are queued whole (never split), a worker takes as
// many as fit in max_batch_size rows, waiting up to max_queue_delay for the batch to fill,
// concatenates them, calls the batch function once and splits the output back. An in-process
// batcher with no queue delay that is idle (nothing queued or running) runs a request on the
// caller's thread instead: there is nothing to batch it with, and the hop would cost more.
class DynamicBatcher final : public Executor {
 public:
  DynamicBatcher(std::size_t input_dim, std::size_t output_dim, BatchFn fn, BatcherOptions options);
  ~DynamicBatcher() override;
  DynamicBatcher(const DynamicBatcher&) = delete;
  DynamicBatcher& operator=(const DynamicBatcher&) = delete;

  std::size_t input_dim() const override { return input_dim_; }
  std::size_t output_dim() const override { return output_dim_; }
  void infer(Matrix x, InferDone done) override;
  void close() override;
  bool in_process() const override { return options_.in_process; }
  BatcherStats stats() const;
  const BatcherOptions& options() const noexcept { return options_; }

 private:
  struct Pending {
    Matrix x;
    InferDone done;
    std::int64_t enqueued_ns;
  };
  void run();
  Status call(const Matrix& x, std::size_t rows, Matrix& output);

  std::size_t input_dim_;
  std::size_t output_dim_;
  BatchFn fn_;
  BatcherOptions options_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Pending> queue_;
  std::size_t queued_rows_ = 0;
  std::size_t running_ = 0;  // batches executing now (workers and callers)
  bool closed_ = false;
  BatcherStats stats_;
  std::vector<std::thread> workers_;
};

// One thread running callbacks at (or after) their time; for per-call deadlines.
class TimerQueue {
 public:
  TimerQueue();
  ~TimerQueue();
  TimerQueue(const TimerQueue&) = delete;
  TimerQueue& operator=(const TimerQueue&) = delete;

  // Runs fn at steady-clock time `at_ns` (ns since the steady clock's epoch); returns an id.
  std::uint64_t schedule(std::int64_t at_ns, std::function<void()> fn);
  // True when the timer was removed before it ran.
  bool cancel(std::uint64_t id);
  void stop();

 private:
  void run();
  std::mutex mu_;
  std::condition_variable cv_;
  std::multimap<std::int64_t, std::uint64_t> by_time_;
  std::map<std::uint64_t, std::pair<std::int64_t, std::function<void()>>> timers_;
  std::uint64_t next_id_ = 1;
  bool stopped_ = false;
  std::thread thread_;
};

// Steady-clock now in ns (the time base of deadlines everywhere in the engine).
std::int64_t steady_now_ns() noexcept;

// Joins a worker thread unless it is the calling one, which is detached instead: an executor
// or pool may be released by its own worker (e.g. when the last request holding a retired
// deployment completes there).
void join_or_detach(std::thread& t);

}  // namespace carrara::core
