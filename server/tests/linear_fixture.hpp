// A small serving setup for the native front's tests and serve_main: entities u0..u99 with
// features user.a = i, user.b = -i in an in-memory store, and linear models
// y = [a, b] @ W + bias with W = [[1, 0], [0, 2]].
//
//   scorer  one variant v3 (version 3), bias [0.5, -0.5], behind a DynamicBatcher
//   ab      control (version 1, bias [0.5, -0.5]) and treatment (version 2, bias + 100), 50/50
//   held    one variant h1 (version 1) whose executor holds every call until released
#pragma once

#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "carrara/core/engine.hpp"

namespace carrara::server::testing {

class MapStore final : public core::FeatureStore {
 public:
  void put(const std::string& key, std::string value);
  void mget(std::span<const std::string> keys, std::vector<std::optional<std::string>>& out,
            std::int64_t deadline_ns) override;
  std::atomic<bool> failing{false};  // mget throws kUnavailable while set
  std::atomic<std::uint64_t> calls{0};

 private:
  std::mutex mu_;
  std::map<std::string, std::string> data_;
};

// Holds every infer() call until release() (after arm(); the deploy's warm-up passes).
class HeldExecutor final : public core::Executor {
 public:
  std::size_t input_dim() const override { return 2; }
  std::size_t output_dim() const override { return 2; }
  void infer(core::Matrix x, core::InferDone done) override;
  void close() override;
  void arm() { armed_ = true; }
  // Waits until `n` calls are held; false after `timeout_ms`.
  bool wait_held(std::size_t n, int timeout_ms);
  void release();

 private:
  std::atomic<bool> armed_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::pair<core::Matrix, core::InferDone>> held_;
};

// [a, b] -> [a + bias0, 2b + bias1]
core::BatchFn linear_fn(float bias0, float bias1);
// The answer of model scorer (bias 0.5, -0.5) for entity u{i} (i < 0: an unknown entity).
std::vector<float> expected(int i, float shift = 0.0f);

struct Setup {
  std::shared_ptr<MapStore> store;
  std::shared_ptr<core::Engine> engine;
  std::shared_ptr<HeldExecutor> held;
};

// An engine with scorer, ab and held deployed.
Setup make_setup(core::EngineOptions options = {});

}  // namespace carrara::server::testing
