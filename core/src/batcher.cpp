#include <algorithm>
#include <chrono>
#include <cstring>

#include "carrara/core/executor.hpp"

namespace carrara::core {

std::int64_t steady_now_ns() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void join_or_detach(std::thread& t) {
  if (!t.joinable()) return;
  if (t.get_id() == std::this_thread::get_id()) {
    t.detach();
  } else {
    t.join();
  }
}

namespace {

std::chrono::steady_clock::time_point at(std::int64_t ns) {
  return std::chrono::steady_clock::time_point(std::chrono::nanoseconds(ns));
}

}  // namespace

// --- DynamicBatcher ------------------------------------------------------------------------

DynamicBatcher::DynamicBatcher(std::size_t input_dim, std::size_t output_dim, BatchFn fn,
                               BatcherOptions options)
    : input_dim_(input_dim), output_dim_(output_dim), fn_(std::move(fn)), options_(options) {
  if (input_dim_ == 0) throw Error(ErrorCode::kInvalidArgument, "batcher input_dim must be > 0");
  if (output_dim_ == 0) throw Error(ErrorCode::kInvalidArgument, "batcher output_dim must be > 0");
  if (options_.max_batch_size == 0) {
    throw Error(ErrorCode::kInvalidArgument, "max_batch_size must be > 0");
  }
  if (options_.workers == 0 || options_.workers > 256) {
    throw Error(ErrorCode::kInvalidArgument, "batcher workers must be in [1, 256]");
  }
  if (options_.max_queue_delay_ns < 0) {
    throw Error(ErrorCode::kInvalidArgument, "max_queue_delay must be >= 0");
  }
  workers_.reserve(options_.workers);
  for (std::size_t i = 0; i < options_.workers; ++i) workers_.emplace_back([this] { run(); });
}

DynamicBatcher::~DynamicBatcher() { close(); }

void DynamicBatcher::infer(Matrix x, InferDone done) {
  if (x.cols != input_dim_ || x.data.size() != x.rows * x.cols) {
    done(Status{ErrorCode::kInvalidArgument,
                "model expects float32 [n, " + std::to_string(input_dim_) + "], got [" +
                    std::to_string(x.rows) + ", " + std::to_string(x.cols) + "]"},
         Matrix{});
    return;
  }
  bool run_here = false;
  {
    std::unique_lock<std::mutex> lock(mu_);
    // Idle, in-process and not waiting for batches to fill: run on the caller's thread. A hop
    // to a worker would cost two context switches for nothing to batch with; under load the
    // queue is not empty (or a batch is running) and requests queue and batch as usual.
    run_here = options_.in_process && options_.max_queue_delay_ns == 0 && !closed_ &&
               queue_.empty() && running_ == 0 && x.rows <= options_.max_batch_size;
    if (run_here) {
      ++running_;
      ++stats_.batches;
      ++stats_.requests;
      stats_.rows += x.rows;
    }
  }
  if (run_here) {
    Matrix output;
    Status status = call(x, x.rows, output);
    bool more = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      --running_;
      more = !queue_.empty();
    }
    if (more) cv_.notify_one();
    done(std::move(status), std::move(output));
    return;
  }
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (closed_) {
      lock.unlock();
      done(Status{ErrorCode::kUnavailable, "model executor is closed (a newer version replaced it)"},
           Matrix{});
      return;
    }
    if (queued_rows_ + x.rows > options_.max_queued_rows) {
      lock.unlock();
      done(Status{ErrorCode::kResourceExhausted,
                  "model queue is full (" + std::to_string(options_.max_queued_rows) + " rows)"},
           Matrix{});
      return;
    }
    queued_rows_ += x.rows;
    queue_.push_back(Pending{std::move(x), std::move(done), steady_now_ns()});
  }
  cv_.notify_one();
}

void DynamicBatcher::run() {
  std::vector<Pending> batch;
  Matrix input;
  Matrix output;
  for (;;) {
    batch.clear();
    bool more = false;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return closed_ || !queue_.empty(); });
      if (queue_.empty()) return;  // closed and drained
      // Wait for the batch to fill, up to the oldest request's queue delay.
      if (options_.max_queue_delay_ns > 0 && !closed_) {
        const std::int64_t deadline = queue_.front().enqueued_ns + options_.max_queue_delay_ns;
        while (!closed_ && queued_rows_ < options_.max_batch_size && steady_now_ns() < deadline) {
          cv_.wait_until(lock, at(deadline));
          if (queue_.empty()) break;
        }
        if (queue_.empty()) continue;
      }
      std::size_t rows = 0;
      while (!queue_.empty()) {
        const std::size_t r = queue_.front().x.rows;
        if (!batch.empty() && rows + r > options_.max_batch_size) break;
        rows += r;
        batch.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      queued_rows_ -= rows;
      ++running_;
      ++stats_.batches;
      stats_.requests += batch.size();
      stats_.rows += rows;
      more = !queue_.empty();
    }
    if (more) cv_.notify_one();  // more work for another worker

    const Matrix* x = &batch.front().x;
    std::size_t rows = x->rows;
    if (batch.size() > 1) {
      rows = 0;
      for (const Pending& p : batch) rows += p.x.rows;
      input.rows = rows;
      input.cols = input_dim_;
      input.data.resize(rows * input_dim_);
      float* dst = input.data.data();
      for (const Pending& p : batch) {
        std::memcpy(dst, p.x.data.data(), p.x.data.size() * sizeof(float));
        dst += p.x.data.size();
      }
      x = &input;
    }
    output = Matrix{};
    Status status = call(*x, rows, output);
    {
      std::lock_guard<std::mutex> lock(mu_);
      --running_;
    }
    if (!status.ok()) {
      for (Pending& p : batch) p.done(status, Matrix{});
      continue;
    }
    if (batch.size() == 1) {
      batch.front().done(Status::Ok(), std::move(output));
      continue;
    }
    const float* src = output.data.data();
    for (Pending& p : batch) {
      Matrix part(p.x.rows, output_dim_);
      std::memcpy(part.data.data(), src, part.data.size() * sizeof(float));
      src += part.data.size();
      p.done(Status::Ok(), std::move(part));
    }
  }
}

Status DynamicBatcher::call(const Matrix& x, std::size_t rows, Matrix& output) {
  Status status;
  try {
    status = fn_(x, output);
  } catch (const Error& e) {
    status = Status::From(e);
  } catch (const std::exception& e) {
    status = Status{ErrorCode::kInternal, e.what()};
  }
  if (status.ok() && (output.rows != rows || output.cols != output_dim_ ||
                      output.data.size() != rows * output_dim_)) {
    status = Status{ErrorCode::kInternal,
                    "model returned [" + std::to_string(output.rows) + ", " +
                        std::to_string(output.cols) + "] for [" + std::to_string(rows) + ", " +
                        std::to_string(input_dim_) + "]; expected [" + std::to_string(rows) +
                        ", " + std::to_string(output_dim_) + "]"};
  }
  return status;
}

void DynamicBatcher::close() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_ && workers_.empty()) return;
    closed_ = true;
  }
  cv_.notify_all();
  // Workers finish what is queued (each request gets its answer), then stop.
  for (std::thread& t : workers_) join_or_detach(t);
  workers_.clear();
}

BatcherStats DynamicBatcher::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  BatcherStats s = stats_;
  s.queued_rows = queued_rows_;
  return s;
}

// --- TimerQueue ----------------------------------------------------------------------------

TimerQueue::TimerQueue() : thread_([this] { run(); }) {}

TimerQueue::~TimerQueue() { stop(); }

std::uint64_t TimerQueue::schedule(std::int64_t at_ns, std::function<void()> fn) {
  std::uint64_t id = 0;
  bool first = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    id = next_id_++;
    first = by_time_.empty() || at_ns < by_time_.begin()->first;
    by_time_.emplace(at_ns, id);
    timers_.emplace(id, std::make_pair(at_ns, std::move(fn)));
  }
  if (first) cv_.notify_one();
  return id;
}

bool TimerQueue::cancel(std::uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = timers_.find(id);
  if (it == timers_.end()) return false;
  auto range = by_time_.equal_range(it->second.first);
  for (auto t = range.first; t != range.second; ++t) {
    if (t->second == id) {
      by_time_.erase(t);
      break;
    }
  }
  timers_.erase(it);
  return true;
}

void TimerQueue::run() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopped_) {
    if (by_time_.empty()) {
      cv_.wait(lock);
      continue;
    }
    const std::int64_t next = by_time_.begin()->first;
    if (steady_now_ns() < next) {
      cv_.wait_until(lock, at(next));
      continue;
    }
    const std::uint64_t id = by_time_.begin()->second;
    by_time_.erase(by_time_.begin());
    auto it = timers_.find(id);
    std::function<void()> fn = std::move(it->second.second);
    timers_.erase(it);
    lock.unlock();
    fn();
    lock.lock();
  }
}

void TimerQueue::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopped_ = true;
  }
  cv_.notify_all();
  join_or_detach(thread_);
}

}  // namespace carrara::core
