// LruTtlCache / FeatureCache: exact LRU per shard, capacity spread, TTL, stats, threads.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "carrara/core/cache.hpp"
#include "carrara/core/clock.hpp"
#include "test_util.hpp"

namespace carrara::core {
namespace {

using testing::expect_error;
using StringCache = LruTtlCache<std::string>;

constexpr std::int64_t kTtl = 1'000;  // ns, with a ManualClock

struct Fixture {
  std::shared_ptr<ManualClock> clock = std::make_shared<ManualClock>(1'000'000);
  StringCache cache;
  explicit Fixture(std::size_t capacity, std::size_t shards = 1, std::int64_t ttl = kTtl)
      : cache(CacheOptions{capacity, ttl, shards}, clock) {}
};

std::string get_or(StringCache& c, std::string_view key, std::string fallback = "<miss>") {
  std::string out;
  return c.get(key, out) ? out : fallback;
}

TEST(Cache, OneShardIsExactLru) {
  Fixture f(3);
  f.cache.put("a", "A");
  f.cache.put("b", "B");
  f.cache.put("c", "C");
  EXPECT_EQ(f.cache.keys_by_recency(0), (std::vector<std::string>{"c", "b", "a"}));
  EXPECT_EQ(get_or(f.cache, "a"), "A");  // a becomes most recent; b is now the oldest
  EXPECT_EQ(f.cache.keys_by_recency(0), (std::vector<std::string>{"a", "c", "b"}));
  f.cache.put("d", "D");
  EXPECT_EQ(f.cache.keys_by_recency(0), (std::vector<std::string>{"d", "a", "c"}));
  EXPECT_EQ(get_or(f.cache, "b"), "<miss>");
  f.cache.put("e", "E");  // evicts c
  EXPECT_EQ(f.cache.keys_by_recency(0), (std::vector<std::string>{"e", "d", "a"}));
  EXPECT_FALSE(f.cache.contains("c"));
  EXPECT_EQ(f.cache.size(), 3u);
  const CacheStats s = f.cache.stats();
  EXPECT_EQ(s.evictions, 2u);
  EXPECT_EQ(s.expirations, 0u);
}

TEST(Cache, ContainsDoesNotTouchRecencyOrCounters) {
  Fixture f(2);
  f.cache.put("a", "A");
  f.cache.put("b", "B");
  EXPECT_TRUE(f.cache.contains("a"));
  EXPECT_FALSE(f.cache.contains("zzz"));
  f.cache.put("c", "C");  // a is still the oldest: contains() did not refresh it
  EXPECT_FALSE(f.cache.contains("a"));
  const CacheStats s = f.cache.stats();
  EXPECT_EQ(s.hits, 0u);
  EXPECT_EQ(s.misses, 0u);
}

TEST(Cache, CapacityIsSpreadExactlyOverShards) {
  struct Case {
    std::size_t capacity, shards, expected_shards;
  };
  for (const Case& c : {Case{10, 4, 4}, Case{16, 16, 16}, Case{17, 16, 16}, Case{3, 16, 3},
                        Case{1, 8, 1}, Case{1000, 7, 7}}) {
    Fixture f(c.capacity, c.shards);
    EXPECT_EQ(f.cache.capacity(), c.capacity);
    EXPECT_EQ(f.cache.shard_count(), c.expected_shards);
    // Far more distinct keys than capacity fills every shard to its own capacity.
    for (int i = 0; i < 20'000; ++i) f.cache.put("key-" + std::to_string(i), "v");
    EXPECT_EQ(f.cache.size(), c.capacity) << c.capacity << "/" << c.shards;
    std::size_t per_shard_total = 0;
    for (std::size_t s = 0; s < f.cache.shard_count(); ++s) {
      const std::size_t n = f.cache.keys_by_recency(s).size();
      // Shard capacities differ by at most one.
      EXPECT_GE(n, c.capacity / c.expected_shards);
      EXPECT_LE(n, c.capacity / c.expected_shards + 1);
      per_shard_total += n;
    }
    EXPECT_EQ(per_shard_total, c.capacity);
    EXPECT_EQ(f.cache.stats().evictions, 20'000u - c.capacity);
  }
}

TEST(Cache, TtlExpiryOnGet) {
  Fixture f(4);
  f.cache.put("a", "A");
  f.clock->advance_ns(kTtl - 1);
  EXPECT_EQ(get_or(f.cache, "a"), "A");  // a read does not extend the TTL
  EXPECT_TRUE(f.cache.contains("a"));
  f.clock->advance_ns(1);  // exactly at the expiry instant: gone
  EXPECT_FALSE(f.cache.contains("a"));
  EXPECT_EQ(f.cache.size(), 1u);  // contains() does not remove
  EXPECT_EQ(get_or(f.cache, "a"), "<miss>");
  EXPECT_EQ(f.cache.size(), 0u);  // get() removed the expired entry
  const CacheStats s = f.cache.stats();
  EXPECT_EQ(s.hits, 1u);
  EXPECT_EQ(s.misses, 1u);
  EXPECT_EQ(s.expirations, 1u);
  EXPECT_EQ(s.evictions, 0u);
  EXPECT_EQ(get_or(f.cache, "a"), "<miss>");  // a plain miss now: no second expiration
  EXPECT_EQ(f.cache.stats().expirations, 1u);
}

TEST(Cache, GetAtAGivenInstant) {
  // get(key, out, now): what Assembler::plan uses to read the clock once per batch.
  Fixture f(4);
  const std::int64_t t0 = f.clock->now_ns();
  f.cache.put("a", "A");
  std::string out;
  EXPECT_TRUE(f.cache.get("a", out, t0 + kTtl - 1));
  EXPECT_EQ(out, "A");
  EXPECT_FALSE(f.cache.get("a", out, t0 + kTtl));
  EXPECT_FALSE(f.cache.get("b", out, t0));
  const CacheStats s = f.cache.stats();
  EXPECT_EQ(s.hits, 1u);
  EXPECT_EQ(s.misses, 2u);
  EXPECT_EQ(s.expirations, 1u);
}

TEST(Cache, PerEntryTtlOverride) {
  Fixture f(8);
  f.cache.put("short", "S", 10);
  f.cache.put("long", "L", 5 * kTtl);
  f.cache.put("default", "D");
  f.cache.put("zero-means-default", "Z", 0);
  f.cache.put("negative-means-default", "N", -5);
  f.clock->advance_ns(10);
  EXPECT_EQ(get_or(f.cache, "short"), "<miss>");
  f.clock->advance_ns(kTtl);
  EXPECT_EQ(get_or(f.cache, "long"), "L");
  EXPECT_EQ(get_or(f.cache, "default"), "<miss>");
  f.clock->advance_ns(4 * kTtl);
  EXPECT_EQ(get_or(f.cache, "long"), "<miss>");
  EXPECT_EQ(f.cache.stats().expirations, 3u);
  EXPECT_EQ(f.cache.default_ttl_ns(), kTtl);
}

TEST(Cache, HugeTtlDoesNotOverflow) {
  // now + ttl must saturate, not wrap into the past (and not be UB).
  auto clock = std::make_shared<ManualClock>(std::numeric_limits<std::int64_t>::max() / 2);
  StringCache c(CacheOptions{4, std::numeric_limits<std::int64_t>::max(), 1}, clock);
  c.put("a", "A");
  c.put("b", "B", std::numeric_limits<std::int64_t>::max());
  clock->advance_ns(1'000'000'000);
  EXPECT_EQ(get_or(c, "a"), "A");
  EXPECT_EQ(get_or(c, "b"), "B");
}

TEST(Cache, PurgeExpired) {
  Fixture f(100, 4);
  for (int i = 0; i < 10; ++i) f.cache.put("old-" + std::to_string(i), "o");
  f.clock->advance_ns(kTtl / 2);
  for (int i = 0; i < 5; ++i) f.cache.put("new-" + std::to_string(i), "n");
  EXPECT_EQ(f.cache.purge_expired(), 0u);
  f.clock->advance_ns(kTtl / 2);
  EXPECT_EQ(f.cache.purge_expired(), 10u);
  EXPECT_EQ(f.cache.size(), 5u);
  EXPECT_EQ(f.cache.stats().expirations, 10u);
  EXPECT_EQ(f.cache.purge_expired(), 0u);
  f.clock->advance_ns(kTtl);
  EXPECT_EQ(f.cache.purge_expired(), 5u);
  EXPECT_EQ(f.cache.size(), 0u);
}

TEST(Cache, ExpiredVictimCountsAsExpirationNotEviction) {
  Fixture f(2);
  f.cache.put("a", "A");
  f.cache.put("b", "B");
  f.clock->advance_ns(kTtl);
  f.cache.put("c", "C");  // pushes out a, which had already expired
  f.cache.put("d", "D");  // pushes out b, likewise
  f.cache.put("e", "E");  // pushes out c, which is live
  const CacheStats s = f.cache.stats();
  EXPECT_EQ(s.expirations, 2u);
  EXPECT_EQ(s.evictions, 1u);
  EXPECT_EQ(f.cache.keys_by_recency(0), (std::vector<std::string>{"e", "d"}));
}

TEST(Cache, StatsAreExact) {
  Fixture f(3);
  f.cache.put("a", "A");                     // ins 1
  f.cache.put("b", "B");                     // ins 2
  EXPECT_EQ(get_or(f.cache, "a"), "A");      // hit 1
  EXPECT_EQ(get_or(f.cache, "x"), "<miss>");  // miss 1
  f.cache.put("c", "C");                     // ins 3
  f.cache.put("d", "D");                     // ins 4, evicts b
  f.cache.put("a", "A2");                    // replace: ins 5, no eviction
  EXPECT_EQ(get_or(f.cache, "b"), "<miss>");  // miss 2
  EXPECT_EQ(get_or(f.cache, "a"), "A2");     // hit 2
  EXPECT_TRUE(f.cache.erase("c"));
  f.clock->advance_ns(kTtl);
  EXPECT_EQ(get_or(f.cache, "d"), "<miss>");  // miss 3, expiration 1
  const CacheStats s = f.cache.stats();
  EXPECT_EQ(s.hits, 2u);
  EXPECT_EQ(s.misses, 3u);
  EXPECT_EQ(s.insertions, 5u);
  EXPECT_EQ(s.evictions, 1u);
  EXPECT_EQ(s.expirations, 1u);
  EXPECT_EQ(s.size, 1u);
  EXPECT_EQ(s.size, f.cache.size());
}

TEST(Cache, ReplaceInPlace) {
  Fixture f(3);
  f.cache.put("a", "A");
  f.cache.put("b", "B");
  f.cache.put("c", "C");
  f.clock->advance_ns(kTtl - 1);
  f.cache.put("a", "A2");  // new value, most recent, fresh TTL, no eviction
  EXPECT_EQ(f.cache.size(), 3u);
  EXPECT_EQ(f.cache.keys_by_recency(0), (std::vector<std::string>{"a", "c", "b"}));
  EXPECT_EQ(f.cache.stats().evictions, 0u);
  f.clock->advance_ns(1);
  EXPECT_EQ(get_or(f.cache, "a"), "A2");
  EXPECT_EQ(get_or(f.cache, "b"), "<miss>");
  f.cache.put("d", "D");  // c has expired too but is only dropped when read or pushed out
  EXPECT_EQ(f.cache.keys_by_recency(0), (std::vector<std::string>{"d", "a", "c"}));
  EXPECT_FALSE(f.cache.contains("c"));
}

TEST(Cache, EraseAndClear) {
  Fixture f(40, 4);  // room for 10 keys however they fall over the shards
  for (int i = 0; i < 10; ++i) f.cache.put("k" + std::to_string(i), "v");
  EXPECT_TRUE(f.cache.erase("k3"));
  EXPECT_FALSE(f.cache.erase("k3"));
  EXPECT_FALSE(f.cache.erase("nope"));
  EXPECT_EQ(f.cache.size(), 9u);
  EXPECT_FALSE(f.cache.contains("k3"));
  f.cache.put("k3", "again");
  EXPECT_EQ(get_or(f.cache, "k3"), "again");
  f.cache.clear();
  EXPECT_EQ(f.cache.size(), 0u);
  EXPECT_EQ(get_or(f.cache, "k1"), "<miss>");
  for (std::size_t s = 0; s < f.cache.shard_count(); ++s) EXPECT_TRUE(f.cache.keys_by_recency(s).empty());
  // Still usable after clear().
  for (int i = 0; i < 10; ++i) f.cache.put("n" + std::to_string(i), "v");
  EXPECT_EQ(f.cache.size(), 10u);
}

TEST(Cache, KeysOutlivePutArguments) {
  // The index stores views into the cached copy of the key, never into the caller's string.
  Fixture f(4);
  {
    std::string k(100, 'x');
    f.cache.put(k, "long");
    std::string s = "s";
    f.cache.put(s, "short");
  }
  EXPECT_EQ(get_or(f.cache, std::string(100, 'x')), "long");
  EXPECT_EQ(get_or(f.cache, "s"), "short");
}

TEST(Cache, InvalidOptionsThrow) {
  auto clock = std::make_shared<ManualClock>();
  expect_error([&] { StringCache(CacheOptions{0, kTtl, 1}, clock); }, ErrorCode::kInvalidArgument,
               {"capacity"});
  expect_error([&] { StringCache(CacheOptions{1, 0, 1}, clock); }, ErrorCode::kInvalidArgument,
               {"ttl"});
  expect_error([&] { StringCache(CacheOptions{1, -1, 1}, clock); }, ErrorCode::kInvalidArgument,
               {"ttl"});
  expect_error([&] { StringCache(CacheOptions{1, kTtl, 0}, clock); }, ErrorCode::kInvalidArgument,
               {"shards"});
  StringCache ok(CacheOptions{4, kTtl, 2}, clock);
  expect_error([&] { (void)ok.keys_by_recency(2); }, ErrorCode::kInvalidArgument);
}

TEST(Cache, DefaultClockIsSteady) {
  FeatureCache c(CacheOptions{});
  EXPECT_EQ(c.capacity(), 10'000u);
  EXPECT_EQ(c.shard_count(), 16u);
  EXPECT_GT(c.clock().now_ns(), 0);
  auto v = std::make_shared<DecodedVector>();
  v->entity_id = "e";
  c.put("g:1:e", v);
  VectorPtr out;
  ASSERT_TRUE(c.get("g:1:e", out));
  EXPECT_EQ(out.get(), v.get());  // the cache shares the decoded vector, never copies it
}

// 8 threads of mixed get/put/erase on a small cache; values encode their key, so any torn or
// misfiled entry shows up as a wrong value.
TEST(Cache, ConcurrentHammering) {
  constexpr int kThreads = 8;
  constexpr int kOpsPerThread = 40'000;
  constexpr int kKeys = 512;
  auto clock = std::make_shared<ManualClock>(0);
  FeatureCache cache(CacheOptions{64, 50'000, 4}, clock);

  std::vector<std::string> keys;
  for (int i = 0; i < kKeys; ++i) keys.push_back("user:3:entity-" + std::to_string(i));

  std::atomic<std::uint64_t> gets{0}, puts{0}, hits{0}, bad{0}, over_capacity{0};
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(static_cast<std::uint32_t>(1234 + t));
      std::uniform_int_distribution<int> pick_key(0, kKeys - 1);
      std::uniform_int_distribution<int> pick_op(0, 99);
      for (int i = 0; i < kOpsPerThread; ++i) {
        const int k = pick_key(rng);
        const int op = pick_op(rng);
        if (op < 60) {
          VectorPtr v;
          gets.fetch_add(1, std::memory_order_relaxed);
          if (cache.get(keys[static_cast<std::size_t>(k)], v)) {
            hits.fetch_add(1, std::memory_order_relaxed);
            if (!v || v->entity_id != keys[static_cast<std::size_t>(k)] || v->values.size() != 2 ||
                v->values[0] != static_cast<float>(k) || v->values[1] != static_cast<float>(-k)) {
              bad.fetch_add(1, std::memory_order_relaxed);
            }
          }
        } else if (op < 90) {
          auto v = std::make_shared<DecodedVector>();
          v->entity_id = keys[static_cast<std::size_t>(k)];
          v->values = {static_cast<float>(k), static_cast<float>(-k)};
          v->missing = {0, 0};
          cache.put(keys[static_cast<std::size_t>(k)], std::move(v), op < 65 ? 100 : 0);
          puts.fetch_add(1, std::memory_order_relaxed);
        } else if (op < 98) {
          cache.erase(keys[static_cast<std::size_t>(k)]);
        } else {
          (void)cache.contains(keys[static_cast<std::size_t>(k)]);
        }
      }
    });
  }
  // Time moves and the sweeper/observer runs while the workers hammer.
  std::thread observer([&] {
    while (!stop.load()) {
      clock->advance_ns(37);
      if (cache.size() > cache.capacity()) over_capacity.fetch_add(1);
      (void)cache.stats();
      (void)cache.purge_expired();
      (void)cache.keys_by_recency(1);
      std::this_thread::yield();
    }
  });
  for (auto& th : threads) th.join();
  stop.store(true);
  observer.join();

  const CacheStats s = cache.stats();
  EXPECT_EQ(bad.load(), 0u);
  EXPECT_EQ(over_capacity.load(), 0u);
  EXPECT_LE(s.size, cache.capacity());
  EXPECT_EQ(s.size, cache.size());
  EXPECT_EQ(s.hits + s.misses, gets.load());
  EXPECT_EQ(s.hits, hits.load());
  EXPECT_EQ(s.insertions, puts.load());
  EXPECT_GT(s.hits, 0u);
  EXPECT_GT(s.evictions, 0u);
  // Every surviving entry is still filed under its own key.
  for (std::size_t sh = 0; sh < cache.shard_count(); ++sh) {
    for (const std::string& k : cache.keys_by_recency(sh)) {
      VectorPtr v;
      if (cache.get(k, v)) {
        EXPECT_EQ(v->entity_id, k);
      }
    }
  }
}

}  // namespace
}  // namespace carrara::core
