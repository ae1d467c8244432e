#include "linear_fixture.hpp"

#include <chrono>

#include "carrara/core/feature_vector.hpp"

namespace carrara::server::testing {

void MapStore::put(const std::string& key, std::string value) {
  std::lock_guard<std::mutex> lock(mu_);
  data_[key] = std::move(value);
}

void MapStore::mget(std::span<const std::string> keys,
                    std::vector<std::optional<std::string>>& out, std::int64_t) {
  calls.fetch_add(1);
  if (failing.load()) throw core::Error(core::ErrorCode::kUnavailable, "store is down (test)");
  std::lock_guard<std::mutex> lock(mu_);
  out.assign(keys.size(), std::nullopt);
  for (std::size_t i = 0; i < keys.size(); ++i) {
    if (auto it = data_.find(keys[i]); it != data_.end()) out[i] = it->second;
  }
}

void HeldExecutor::infer(core::Matrix x, core::InferDone done) {
  if (!armed_) {
    core::Matrix y;
    const core::Status s = linear_fn(0.5f, -0.5f)(x, y);
    done(s, std::move(y));
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    held_.emplace_back(std::move(x), std::move(done));
  }
  cv_.notify_all();
}

bool HeldExecutor::wait_held(std::size_t n, int timeout_ms) {
  std::unique_lock<std::mutex> lock(mu_);
  return cv_.wait_for(lock, std::chrono::milliseconds(timeout_ms), [&] { return held_.size() >= n; });
}

void HeldExecutor::release() {
  std::vector<std::pair<core::Matrix, core::InferDone>> calls;
  {
    std::lock_guard<std::mutex> lock(mu_);
    calls.swap(held_);
  }
  for (auto& [x, done] : calls) {
    core::Matrix y;
    const core::Status s = linear_fn(0.5f, -0.5f)(x, y);
    done(s, std::move(y));
  }
}

void HeldExecutor::close() {
  armed_ = false;
  release();
}

core::BatchFn linear_fn(float bias0, float bias1) {
  return [bias0, bias1](const core::Matrix& x, core::Matrix& out) {
    out = core::Matrix(x.rows, 2);
    for (std::size_t i = 0; i < x.rows; ++i) {
      out.row(i)[0] = x.row(i)[0] + bias0;
      out.row(i)[1] = 2.0f * x.row(i)[1] + bias1;
    }
    return core::Status::Ok();
  };
}

std::vector<float> expected(int i, float shift) {
  const float a = i < 0 ? 0.0f : static_cast<float>(i);
  return {a + 0.5f + shift, -2.0f * a - 0.5f + shift};
}

namespace {

core::AssemblerSpec spec() {
  core::AssemblerSpec s;
  s.groups.push_back(core::GroupSchema{"user", 1, {"a", "b"}});
  s.features.push_back(core::FeatureRef{"user", "a", 0.0f});
  s.features.push_back(core::FeatureRef{"user", "b", 0.0f});
  return s;
}

core::VariantConfig variant(std::string name, std::uint32_t version,
                            std::shared_ptr<core::Executor> executor) {
  core::VariantConfig v;
  v.name = std::move(name);
  v.version = version;
  v.features = spec();
  v.timeout_ns = 10'000'000'000;
  v.executor = std::move(executor);
  return v;
}

std::shared_ptr<core::Executor> batcher(float bias0, float bias1) {
  core::BatcherOptions o;
  o.max_batch_size = 64;
  return std::make_shared<core::DynamicBatcher>(2, 2, linear_fn(bias0, bias1), o);
}

}  // namespace

Setup make_setup(core::EngineOptions options) {
  Setup s;
  s.store = std::make_shared<MapStore>();
  for (int i = 0; i < 100; ++i) {
    core::DecodedVector v;
    v.entity_id = "u" + std::to_string(i);
    v.group = "user";
    v.group_version = 1;
    v.values = {static_cast<float>(i), static_cast<float>(-i)};
    s.store->put("user:1:" + v.entity_id, core::encode_feature_vector(v));
  }
  core::CacheOptions cache_options;
  cache_options.capacity = 1'000;
  s.engine = std::make_shared<core::Engine>(
      options, std::make_shared<core::FeatureCache>(cache_options), s.store);

  core::ModelConfig scorer;
  scorer.model = "scorer";
  scorer.policy.variants = {core::VariantSpec{"v3", core::kBasisPoints, false}};
  scorer.variants.push_back(variant("v3", 3, batcher(0.5f, -0.5f)));
  s.engine->deploy(std::move(scorer));

  core::ModelConfig ab;
  ab.model = "ab";
  ab.policy.salt = "ab-7";
  ab.policy.variants = {core::VariantSpec{"control", 5'000, false},
                        core::VariantSpec{"treatment", 5'000, false}};
  ab.variants.push_back(variant("control", 1, batcher(0.5f, -0.5f)));
  ab.variants.push_back(variant("treatment", 2, batcher(100.5f, 99.5f)));
  s.engine->deploy(std::move(ab));

  s.held = std::make_shared<HeldExecutor>();
  core::ModelConfig held;
  held.model = "held";
  held.policy.variants = {core::VariantSpec{"h1", core::kBasisPoints, false}};
  held.variants.push_back(variant("h1", 1, s.held));
  s.engine->deploy(std::move(held));
  s.held->arm();
  return s;
}

}  // namespace carrara::server::testing
