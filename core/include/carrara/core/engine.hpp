// Engine: the serving path of the native front, with no Python in it.
//
//   admission -> route (sticky split) -> cache (+ negative entries) -> store MGET of misses
//   (deadline; failures degrade, never fail) -> assemble -> executor (batcher / Triton) with a
//   per-variant timeout, breaker and fallback -> response -> prediction log (bounded in bytes).
//
// Deployments are immutable snapshots swapped whole: a request keeps the snapshot it started
// with. Every entry point is thread-safe; predict() completes through a callback on whichever
// thread finished the work (the caller's own for cache hits with a synchronous executor).
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "carrara/core/assembler.hpp"
#include "carrara/core/cache.hpp"
#include "carrara/core/executor.hpp"
#include "carrara/core/feature_store.hpp"
#include "carrara/core/router.hpp"

namespace carrara::core {

struct EngineOptions {
  std::size_t max_in_flight = 256;        // requests admitted at once, all models together
  std::size_t max_batch = 1'000;          // entities per request
  std::size_t max_entity_id_bytes = 1'024;  // longer ids are refused (INVALID_ARGUMENT)
  std::int64_t store_deadline_ns = 50'000'000;   // online-store read budget per request
  std::int64_t negative_ttl_ns = 5'000'000'000;  // how long "no row" is remembered
  std::size_t log_max_bytes = 64u << 20;  // prediction-log queue bound; past it records drop
  bool log_predictions = false;
};

// One model version inside a deployment.
struct VariantConfig {
  std::string name;
  std::uint32_t version = 0;
  AssemblerSpec features;
  std::int64_t timeout_ns = 1'000'000'000;
  std::uint32_t failure_threshold = 5;
  std::int64_t reset_after_ns = 5'000'000'000;
  std::shared_ptr<Executor> executor;
};

struct ModelConfig {
  std::string model;
  RoutingPolicy policy;
  std::vector<VariantConfig> variants;
  std::size_t max_in_flight = 0;  // 0 = bounded by the engine's limit only
};

struct OverrideInput {
  std::string name;           // column name ("feature" or "group.feature")
  std::vector<float> values;  // one value, or one per entity
};

struct PredictCall {
  std::string model;
  std::string version;  // "" = any; otherwise must be one of the deployed versions
  std::vector<std::string> entity_ids;
  std::vector<OverrideInput> overrides;
  std::string request_id;  // "" = the engine makes one
};

struct VariantId {
  std::string name;
  std::uint32_t version = 0;
};

struct PredictOutcome {
  std::string model;
  std::string request_id;
  Matrix outputs;                          // [n, k], request order
  std::vector<std::uint16_t> variant;      // per entity: index into `variants`
  std::vector<VariantId> variants;         // the deployment's variants
  std::vector<std::uint8_t> degraded;      // per entity
  std::int64_t latency_us = 0;

  bool any_degraded() const noexcept;
};

using PredictDone = std::function<void(Status, PredictOutcome)>;

// What the fronts show about a deployed model (KServe metadata/config).
struct ModelView {
  std::string name;
  std::vector<std::string> versions;  // deployed versions, sorted, as strings
  std::vector<VariantId> variants;
  std::size_t output_dim = 0;
  std::vector<std::string> columns;   // feature columns of the first routed variant
};

struct ModelStatsSnapshot {
  std::string name;
  std::uint64_t success_count = 0;
  std::uint64_t success_ns = 0;
  std::uint64_t fail_count = 0;
  std::uint64_t fail_ns = 0;
  std::uint64_t last_inference_ms = 0;
  std::uint64_t entities = 0;
};

// Prometheus-style latency buckets, seconds (the last, +Inf, is implied).
inline constexpr std::array<double, 13> kLatencyBuckets = {
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0};

struct VariantMetrics {
  std::string model;
  std::string variant;
  std::uint32_t version = 0;
  std::uint64_t requests = 0;
  std::uint64_t entities = 0;
  // Times this variant failed to answer: its backend erred or timed out, its breaker was
  // open, its features could not be assembled (caller errors are not counted). A fallback may
  // then have answered for it (counted there, degraded).
  std::uint64_t errors = 0;
  // Entities this variant answered degraded (defaults for missing features, store down, or
  // answered as the fallback of a failed variant).
  std::uint64_t degraded = 0;
  double latency_sum_s = 0;
  std::array<std::uint64_t, kLatencyBuckets.size() + 1> buckets{};  // non-cumulative
};

struct ErrorCount {
  std::string model;
  ErrorCode code = ErrorCode::kOk;
  std::uint64_t count = 0;
};

struct EngineMetrics {
  std::vector<VariantMetrics> variants;
  std::vector<ErrorCount> errors;
  std::vector<std::pair<std::string, std::uint64_t>> degraded;  // model -> entities
  std::uint64_t shed = 0;
  std::uint64_t store_errors = 0;
  std::uint64_t log_records = 0;  // records queued so far (drained or not)
  std::uint64_t log_dropped = 0;  // records
  std::size_t log_queued_bytes = 0;
  std::size_t in_flight = 0;
  std::size_t max_in_flight = 0;  // the engine's admission bound
};

// One variant's share of one request, for the prediction log (expanded into records later).
struct LogBatch {
  std::string model;
  std::string request_id;
  std::string variant;
  std::uint32_t version = 0;
  std::shared_ptr<const std::vector<std::string>> columns;
  std::vector<std::string> entity_ids;
  std::vector<std::uint32_t> rows;  // row of each entity in the request
  Matrix features;                  // [m, d]
  std::vector<std::uint8_t> missing;  // [m, d]
  Matrix outputs;                   // [m, k]
  std::vector<std::uint8_t> degraded;
  std::int64_t latency_us = 0;
  std::int64_t timestamp_ms = 0;
  bool shadow = false;

  std::size_t bytes() const noexcept;
};

class Engine {
 public:
  Engine(EngineOptions options, std::shared_ptr<FeatureCache> cache,
         std::shared_ptr<FeatureStore> store);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Validates, warms every variant up (one row of zeros; a model that cannot run fails the
  // deploy) and switches the model's snapshot in. Throws Error(kInvalidArgument) on a bad
  // config. Blocks until the warm-up calls returned.
  void deploy(ModelConfig config);
  void undeploy(std::string_view model);

  void predict(PredictCall call, PredictDone done);

  std::vector<std::string> models() const;
  std::optional<ModelView> model(std::string_view name) const;
  bool ready() const;
  void set_draining(bool draining);
  bool draining() const noexcept { return draining_.load(std::memory_order_relaxed); }
  std::size_t in_flight() const noexcept { return in_flight_.load(std::memory_order_relaxed); }
  // Waits until nothing is in flight; false on timeout.
  bool wait_idle(std::int64_t timeout_ns);

  std::vector<ModelStatsSnapshot> statistics(std::string_view model) const;  // "" = all
  EngineMetrics metrics() const;
  const EngineOptions& options() const noexcept { return options_; }
  FeatureCache& cache() noexcept { return *cache_; }

  // Takes up to `max_records` entities' worth of queued log batches, waiting up to `wait_ns`
  // for the first one. Returns false once the log is closed and empty.
  bool drain_log(std::vector<LogBatch>& out, std::size_t max_records, std::int64_t wait_ns);
  // Wakes drain_log waiters; after it, drain_log returns what is left and then false.
  void close_log();

  // Stops timers and closes every executor (after draining callers have finished).
  void close();

  struct Impl;
  // Internal: releases one admission slot; returns what is left in flight.
  std::size_t in_flight_dec() noexcept;

 private:
  EngineOptions options_;
  std::shared_ptr<FeatureCache> cache_;
  std::unique_ptr<Impl> impl_;
  std::atomic<bool> draining_{false};
  std::atomic<std::size_t> in_flight_{0};
};

}  // namespace carrara::core
