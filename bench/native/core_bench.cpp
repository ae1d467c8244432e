// Microbenchmarks of the serving core's hot path, one per DESIGN.md §5 target:
//   BM_CacheHit          <= 100 ns   FeatureCache::get of a present key
//   BM_Decode32          <= 200 ns   FeatureVector decode, 32 floats
//   BM_AssembleCached96  <= 1 us     plan() on a warm cache + assemble(), 1 row x 96 features
//   BM_Route             <= 50 ns    Router::route
// plus cases without a target, for trends: BM_Decode32Shared, BM_Encode32,
// BM_AssembleCached96_10kEntities and BM_AssembleCached96Batch256.
// Keys are realistic ("user_profile:3:user-104217"), looked up in a random order.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "carrara/core/assembler.hpp"
#include "carrara/core/cache.hpp"
#include "carrara/core/feature_vector.hpp"
#include "carrara/core/router.hpp"

namespace cc = carrara::core;

namespace {

constexpr std::size_t kEntities = 10'000;
constexpr std::size_t kLookups = 1 << 14;  // precomputed random picks, cycled

std::string entity_id(std::size_t i) { return "user-" + std::to_string(100'000 + i); }

// kLookups strings picked at random from `pool`, stored back to back in lookup order: reading
// the next key is a sequential (prefetched) access, as a key built for the request would be hot.
class KeySequence {
 public:
  KeySequence(const std::vector<std::string>& pool, std::uint32_t seed) {
    std::mt19937 rng(seed);
    std::uniform_int_distribution<std::size_t> pick(0, pool.size() - 1);
    std::vector<std::size_t> picks(kLookups);
    std::size_t bytes = 0;
    for (auto& p : picks) {
      p = pick(rng);
      bytes += pool[p].size();
    }
    arena_.reserve(bytes);
    for (std::size_t p : picks) arena_ += pool[p];
    std::size_t at = 0;
    for (std::size_t p : picks) {
      views_.emplace_back(arena_.data() + at, pool[p].size());
      at += pool[p].size();
    }
  }
  std::string_view next() noexcept { return views_[i_++ & (kLookups - 1)]; }

 private:
  std::string arena_;
  std::vector<std::string_view> views_;
  std::size_t i_ = 0;
};

cc::DecodedVector make_vector(const std::string& group, std::uint32_t version, const std::string& entity,
                              std::size_t n) {
  cc::DecodedVector v;
  v.entity_id = entity;
  v.group = group;
  v.group_version = version;
  v.event_timestamp_us = 1'732'800'000'000'000;
  v.created_timestamp_us = 1'732'800'000'500'000;
  v.values.resize(n);
  v.missing.assign(n, 0);
  for (std::size_t i = 0; i < n; ++i) v.values[i] = static_cast<float>(i) * 0.25f + 1.0f;
  if (n > 5) v.missing[5] = 1;  // one missing value, so the bitmap is present
  return v;
}

// Three groups of 32 features each; the spec selects all 96.
cc::AssemblerSpec spec96() {
  cc::AssemblerSpec spec;
  for (const char* g : {"user_profile", "user_activity", "user_risk"}) {
    cc::GroupSchema gs{g, 3, {}};
    for (int f = 0; f < 32; ++f) gs.features.push_back(std::string(g) + "_f" + std::to_string(f));
    for (const std::string& f : gs.features) spec.features.push_back(cc::FeatureRef{g, f, -1.0f});
    spec.groups.push_back(std::move(gs));
  }
  return spec;
}

// A 16-shard cache holding every (group, entity) row of `entities` entities.
std::unique_ptr<cc::FeatureCache> warm_cache(const cc::Assembler& a, std::size_t entities) {
  auto cache = std::make_unique<cc::FeatureCache>(
      cc::CacheOptions{2 * entities * a.group_count(), 3'600'000'000'000, 16});
  for (std::size_t g = 0; g < a.group_count(); ++g) {
    const cc::GroupSchema& gs = a.spec().groups[g];
    for (std::size_t e = 0; e < entities; ++e) {
      cache->put(a.key(g, entity_id(e)),
                 std::make_shared<cc::DecodedVector>(make_vector(gs.name, gs.version, entity_id(e), 32)));
    }
  }
  return cache;
}

void BM_CacheHit(benchmark::State& state) {
  // 10k entries (each its own decoded vector) in 16 shards, capacity 2x so nothing is evicted;
  // random existing keys. get() copies the shared_ptr: one refcount increment per hit.
  cc::FeatureCache cache(cc::CacheOptions{2 * kEntities, 3'600'000'000'000, 16});
  std::vector<std::string> keys;
  for (std::size_t i = 0; i < kEntities; ++i) {
    keys.push_back("user_profile:3:" + entity_id(i));
    cache.put(keys.back(),
              std::make_shared<cc::DecodedVector>(make_vector("user_profile", 3, entity_id(i), 32)));
  }
  if (cache.size() != kEntities) state.SkipWithError("cache did not keep every entry");
  KeySequence seq(keys, 1);
  std::size_t hits = 0;
  cc::VectorPtr out;
  for (auto _ : state) {
    const bool hit = cache.get(seq.next(), out);
    benchmark::DoNotOptimize(hit);
    benchmark::DoNotOptimize(out);
    hits += hit ? 1 : 0;
  }
  if (hits != static_cast<std::size_t>(state.iterations())) state.SkipWithError("a lookup missed");
}
BENCHMARK(BM_CacheHit);

void BM_Decode32(benchmark::State& state) {
  const std::string bytes = cc::encode_feature_vector(make_vector("user_profile", 3, "user-123456", 32));
  cc::DecodedVector out;  // reused, as decode(bytes, out) allows
  for (auto _ : state) {
    cc::decode_feature_vector(bytes, out);
    benchmark::DoNotOptimize(out.values.data());
    benchmark::ClobberMemory();
  }
  if (out.values.size() != 32 || out.missing[5] != 1) state.SkipWithError("bad decode");
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * bytes.size()));
}
BENCHMARK(BM_Decode32);

void BM_Decode32Shared(benchmark::State& state) {
  // The cache-fill path: a fresh shared DecodedVector per value.
  const std::string bytes = cc::encode_feature_vector(make_vector("user_profile", 3, "user-123456", 32));
  for (auto _ : state) {
    cc::VectorPtr v = cc::decode_feature_vector(bytes);
    benchmark::DoNotOptimize(v);
  }
}
BENCHMARK(BM_Decode32Shared);

void BM_Encode32(benchmark::State& state) {
  const cc::DecodedVector v = make_vector("user_profile", 3, "user-123456", 32);
  for (auto _ : state) {
    std::string bytes = cc::encode_feature_vector(v);
    benchmark::DoNotOptimize(bytes);
  }
}
BENCHMARK(BM_Encode32);

// The full cached path for one entity: plan() (3 cache hits) + assemble() of 96 columns, for a
// random entity of `entities` whose rows are all in the cache.
void assemble_cached_96(benchmark::State& state, std::size_t entities) {
  const cc::Assembler a(spec96());
  auto cache = warm_cache(a, entities);
  std::vector<std::string> ids;
  for (std::size_t e = 0; e < entities; ++e) ids.push_back(entity_id(e));
  KeySequence seq(ids, 2);
  std::vector<float> out(a.dim());
  std::vector<std::uint8_t> mask(a.dim());
  std::size_t misses = 0;
  for (auto _ : state) {
    const std::string_view id = seq.next();
    const cc::Plan plan = a.plan(*cache, std::span<const std::string_view>(&id, 1));
    misses += plan.miss_keys.size();
    a.assemble(plan, out.data(), mask.data());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  if (misses != 0) state.SkipWithError("cache misses in the cached benchmark");
  if (out[0] != 1.0f || mask[5] != 1 || mask[0] != 0) state.SkipWithError("wrong row");
}
// The §5 target case: a hot set of 1,000 entities (3,000 cached vectors, ~2 MB: they stay in
// the CPU caches, as the hot part of a skewed real workload does).
void BM_AssembleCached96(benchmark::State& state) { assemble_cached_96(state, 1'000); }
BENCHMARK(BM_AssembleCached96);

// 10,000 entities drawn uniformly (30,000 vectors, ~20 MB): most lookups miss the CPU caches,
// so this measures memory latency (~30 dependent DRAM reads per row) more than code.
void BM_AssembleCached96_10kEntities(benchmark::State& state) { assemble_cached_96(state, 10'000); }
BENCHMARK(BM_AssembleCached96_10kEntities);

void BM_AssembleCached96Batch256(benchmark::State& state) {
  // A 256-entity batch (of 10,000 cached entities) through the same path; items/s counts rows.
  constexpr std::size_t kBatch = 256;
  const cc::Assembler a(spec96());
  auto cache = warm_cache(a, kEntities);
  std::vector<std::string> ids;
  for (std::size_t e = 0; e < kEntities; ++e) ids.push_back(entity_id(e));
  KeySequence seq(ids, 3);
  std::vector<float> out(kBatch * a.dim());
  std::vector<std::uint8_t> mask(kBatch * a.dim());
  std::vector<std::string_view> batch(kBatch);
  std::size_t misses = 0;
  for (auto _ : state) {
    for (auto& id : batch) id = seq.next();
    const cc::Plan plan = a.plan(*cache, batch);
    misses += plan.miss_keys.size();
    a.assemble(plan, out.data(), mask.data());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  if (misses != 0) state.SkipWithError("cache misses in the cached benchmark");
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * kBatch));
}
BENCHMARK(BM_AssembleCached96Batch256);

void BM_Route(benchmark::State& state) {
  cc::RoutingPolicy policy;
  policy.salt = "ranker-2026-11";
  policy.variants = {{"ranker-v7", 4500, false}, {"ranker-v8", 4500, false}, {"ranker-v9-canary", 1000, true}};
  policy.fallback = "ranker-v7";
  const cc::Router router(policy);
  std::vector<std::string> ids;
  for (std::size_t e = 0; e < 100'000; ++e) ids.push_back("user-" + std::to_string(100'000 + e));
  KeySequence seq(ids, 4);
  for (auto _ : state) {
    const std::uint32_t v = router.route(seq.next());
    benchmark::DoNotOptimize(v);
  }
}
BENCHMARK(BM_Route);

}  // namespace

BENCHMARK_MAIN();
