// Sharded LRU cache with a per-entry TTL.
//
// Each shard is a mutex, an intrusive recency list and a hash index whose keys are views into
// the list nodes (one copy of each key). LRU order is exact within a shard and approximate
// across shards, as in every sharded cache; a cache with one shard is an exact LRU.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "carrara/core/clock.hpp"
#include "carrara/core/error.hpp"
#include "carrara/core/feature_vector.hpp"

namespace carrara::core {

struct CacheStats {
  std::uint64_t hits = 0;
  std::uint64_t misses = 0;
  std::uint64_t insertions = 0;
  std::uint64_t evictions = 0;    // live entries pushed out by capacity
  std::uint64_t expirations = 0;  // entries found past their TTL (on read, sweep or eviction)
  std::size_t size = 0;
};

struct CacheOptions {
  std::size_t capacity = 10'000;
  std::int64_t ttl_ns = 30'000'000'000;  // 30 s, as the seed gateway's cache
  std::size_t shards = 16;
};

template <class V>
class LruTtlCache {
 public:
  explicit LruTtlCache(CacheOptions options, std::shared_ptr<Clock> clock = nullptr)
      : clock_(clock ? std::move(clock) : steady_clock()), default_ttl_ns_(options.ttl_ns) {
    if (options.capacity == 0) throw Error(ErrorCode::kInvalidArgument, "cache capacity must be > 0");
    if (options.ttl_ns <= 0) throw Error(ErrorCode::kInvalidArgument, "cache ttl must be > 0");
    if (options.shards == 0) throw Error(ErrorCode::kInvalidArgument, "cache shards must be > 0");
    std::size_t n = std::min(options.shards, options.capacity);
    shards_ = std::vector<Shard>(n);
    for (std::size_t i = 0; i < n; ++i) {
      // Spread the capacity exactly: the total equals what was asked for.
      shards_[i].capacity = options.capacity / n + (i < options.capacity % n ? 1 : 0);
    }
    capacity_ = options.capacity;
  }

  LruTtlCache(const LruTtlCache&) = delete;
  LruTtlCache& operator=(const LruTtlCache&) = delete;

  // Copies the value into `out` and marks the entry most recently used. False on miss/expiry.
  bool get(std::string_view key, V& out) { return get(key, out, clock_->now_ns()); }

  // The same, as of `now` on clock(): a batch of lookups can read the clock once.
  bool get(std::string_view key, V& out, std::int64_t now) {
    const HashedKey hk = hashed(key);
    Shard& s = shard_for(hk.hash);
    std::lock_guard<std::mutex> lock(s.mu);
    auto it = s.index.find(hk);
    if (it == s.index.end()) {
      ++s.stats.misses;
      return false;
    }
    auto node = it->second;
    if (node->expires_at_ns <= now) {
      s.index.erase(it);
      s.lru.erase(node);
      ++s.stats.expirations;
      ++s.stats.misses;
      return false;
    }
    if (node != s.lru.begin()) s.lru.splice(s.lru.begin(), s.lru, node);
    ++s.stats.hits;
    out = node->value;
    return true;
  }

  // Inserts or replaces; ttl_ns <= 0 means the cache's default TTL.
  void put(std::string_view key, V value, std::int64_t ttl_ns = 0) {
    const HashedKey hk = hashed(key);
    Shard& s = shard_for(hk.hash);
    const std::int64_t now = clock_->now_ns();
    const std::int64_t expires = expiry(now, ttl_ns > 0 ? ttl_ns : default_ttl_ns_);
    std::lock_guard<std::mutex> lock(s.mu);
    auto it = s.index.find(hk);
    if (it != s.index.end()) {
      auto node = it->second;
      node->value = std::move(value);
      node->expires_at_ns = expires;
      s.lru.splice(s.lru.begin(), s.lru, node);
      ++s.stats.insertions;
      return;
    }
    while (s.lru.size() >= s.capacity) {
      Entry& victim = s.lru.back();
      if (victim.expires_at_ns <= now) {
        ++s.stats.expirations;
      } else {
        ++s.stats.evictions;
      }
      s.index.erase(HashedKey{victim.key, victim.hash});
      s.lru.pop_back();
    }
    s.lru.emplace_front(Entry{std::string(key), hk.hash, std::move(value), expires});
    s.index.emplace(HashedKey{s.lru.front().key, hk.hash}, s.lru.begin());
    ++s.stats.insertions;
  }

  bool erase(std::string_view key) {
    const HashedKey hk = hashed(key);
    Shard& s = shard_for(hk.hash);
    std::lock_guard<std::mutex> lock(s.mu);
    auto it = s.index.find(hk);
    if (it == s.index.end()) return false;
    auto node = it->second;
    s.index.erase(it);
    s.lru.erase(node);
    return true;
  }

  // Whether a live entry exists; does not touch recency or counters.
  bool contains(std::string_view key) const {
    const HashedKey hk = hashed(key);
    const Shard& s = shard_for(hk.hash);
    const std::int64_t now = clock_->now_ns();
    std::lock_guard<std::mutex> lock(s.mu);
    auto it = s.index.find(hk);
    return it != s.index.end() && it->second->expires_at_ns > now;
  }

  // Drops every expired entry; returns how many.
  std::size_t purge_expired() {
    const std::int64_t now = clock_->now_ns();
    std::size_t purged = 0;
    for (Shard& s : shards_) {
      std::lock_guard<std::mutex> lock(s.mu);
      for (auto it = s.lru.begin(); it != s.lru.end();) {
        if (it->expires_at_ns <= now) {
          s.index.erase(HashedKey{it->key, it->hash});
          it = s.lru.erase(it);
          ++s.stats.expirations;
          ++purged;
        } else {
          ++it;
        }
      }
    }
    return purged;
  }

  void clear() {
    for (Shard& s : shards_) {
      std::lock_guard<std::mutex> lock(s.mu);
      s.index.clear();
      s.lru.clear();
    }
  }

  // Keys of one shard from most to least recently used (for tests and debugging).
  std::vector<std::string> keys_by_recency(std::size_t shard) const {
    if (shard >= shards_.size()) throw Error(ErrorCode::kInvalidArgument, "no such shard");
    const Shard& s = shards_[shard];
    std::lock_guard<std::mutex> lock(s.mu);
    std::vector<std::string> out;
    out.reserve(s.lru.size());
    for (const Entry& e : s.lru) out.push_back(e.key);
    return out;
  }

  std::size_t size() const {
    std::size_t n = 0;
    for (const Shard& s : shards_) {
      std::lock_guard<std::mutex> lock(s.mu);
      n += s.lru.size();
    }
    return n;
  }

  CacheStats stats() const {
    CacheStats total;
    for (const Shard& s : shards_) {
      std::lock_guard<std::mutex> lock(s.mu);
      total.hits += s.stats.hits;
      total.misses += s.stats.misses;
      total.insertions += s.stats.insertions;
      total.evictions += s.stats.evictions;
      total.expirations += s.stats.expirations;
      total.size += s.lru.size();
    }
    return total;
  }

  std::size_t capacity() const noexcept { return capacity_; }
  std::size_t shard_count() const noexcept { return shards_.size(); }
  std::int64_t default_ttl_ns() const noexcept { return default_ttl_ns_; }
  const Clock& clock() const noexcept { return *clock_; }

 private:
  struct Entry {
    std::string key;
    std::size_t hash;  // of key, computed once per call and kept for eviction
    V value;
    std::int64_t expires_at_ns;
  };
  using Node = typename std::list<Entry>::iterator;

  // A key with its hash: the shard and the index bucket come from one hash computation.
  struct HashedKey {
    std::string_view key;
    std::size_t hash;
  };
  struct HashedKeyHash {
    std::size_t operator()(const HashedKey& k) const noexcept { return k.hash; }
  };
  struct HashedKeyEq {
    bool operator()(const HashedKey& a, const HashedKey& b) const noexcept {
      return a.hash == b.hash && a.key == b.key;
    }
  };

  struct Shard {
    mutable std::mutex mu;
    std::list<Entry> lru;  // front = most recently used
    std::unordered_map<HashedKey, Node, HashedKeyHash, HashedKeyEq> index;
    std::size_t capacity = 0;
    CacheStats stats;
  };

  HashedKey hashed(std::string_view key) const noexcept { return HashedKey{key, hash_(key)}; }
  Shard& shard_for(std::size_t h) { return shards_[mix(h) % shards_.size()]; }
  const Shard& shard_for(std::size_t h) const { return shards_[mix(h) % shards_.size()]; }
  // The index buckets by the same hash (modulo a prime); mixing keeps the shard choice and
  // the bucket choice from using the same bits.
  static std::size_t mix(std::size_t h) noexcept { return (h * 0x9E3779B97F4A7C15ULL) >> 32; }
  // now + ttl, saturated: a huge TTL means "never expires", not a wrap into the past (and
  // signed overflow is UB).
  static std::int64_t expiry(std::int64_t now, std::int64_t ttl) noexcept {
    return now > std::numeric_limits<std::int64_t>::max() - ttl
               ? std::numeric_limits<std::int64_t>::max()
               : now + ttl;
  }

  std::shared_ptr<Clock> clock_;
  std::int64_t default_ttl_ns_;
  std::size_t capacity_ = 0;
  std::vector<Shard> shards_;
  std::hash<std::string_view> hash_;
};

// The gateway's cache: decoded feature vectors keyed by "{group}:{version}:{entity_id}".
using FeatureCache = LruTtlCache<VectorPtr>;

}  // namespace carrara::core
