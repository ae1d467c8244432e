#include "carrara/core/router.hpp"

#include <algorithm>
#include <unordered_set>

#include "carrara/core/error.hpp"

namespace carrara::core {

namespace {

constexpr std::uint64_t kFnvOffset = 0xcbf29ce484222325ULL;
constexpr std::uint64_t kFnvPrime = 0x100000001b3ULL;

inline std::uint64_t fnv1a(std::uint64_t state, std::string_view s) noexcept {
  for (unsigned char c : s) {
    state ^= c;
    state *= kFnvPrime;
  }
  return state;
}

// murmur3's 64-bit finalizer: spreads FNV's weak low bits over the whole word.
inline std::uint64_t fmix64(std::uint64_t k) noexcept {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdULL;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ULL;
  k ^= k >> 33;
  return k;
}

inline std::uint64_t salted(std::string_view salt) noexcept {
  std::uint64_t s = fnv1a(kFnvOffset, salt);
  s ^= 0x1FU;
  return s * kFnvPrime;
}

}  // namespace

std::uint64_t stable_hash(std::string_view salt, std::string_view id) noexcept {
  return fmix64(fnv1a(salted(salt), id));
}

Router::Router(RoutingPolicy policy) : policy_(std::move(policy)) {
  if (policy_.variants.empty()) {
    throw Error(ErrorCode::kInvalidArgument, "routing policy needs at least one variant");
  }
  std::unordered_set<std::string> names;
  std::uint64_t total = 0;
  for (const VariantSpec& v : policy_.variants) {
    if (v.name.empty()) throw Error(ErrorCode::kInvalidArgument, "variant name must not be empty");
    if (!names.insert(v.name).second) {
      throw Error(ErrorCode::kInvalidArgument, "variant '" + v.name + "' listed twice");
    }
    total += v.weight_bp;
  }
  if (total != kBasisPoints) {
    throw Error(ErrorCode::kInvalidArgument,
                "variant weights sum to " + std::to_string(total) +
                    " basis points; they must sum to 10000 (100%)");
  }
  for (const std::string& s : policy_.shadows) {
    if (names.count(s) != 0) {
      throw Error(ErrorCode::kInvalidArgument,
                  "variant '" + s + "' cannot be both routed and a shadow");
    }
  }
  if (!policy_.fallback.empty()) {
    for (std::size_t i = 0; i < policy_.variants.size(); ++i) {
      if (policy_.variants[i].name == policy_.fallback) fallback_index_ = static_cast<int>(i);
    }
    if (fallback_index_ < 0) {
      throw Error(ErrorCode::kInvalidArgument,
                  "fallback '" + policy_.fallback + "' is not one of the variants");
    }
  }
  // Canaries first (lowest buckets), then the rest, each group in declaration order.
  for (int pass = 0; pass < 2; ++pass) {
    for (std::size_t i = 0; i < policy_.variants.size(); ++i) {
      const VariantSpec& v = policy_.variants[i];
      if (v.weight_bp == 0 || v.canary != (pass == 0)) continue;
      const std::uint32_t lo = upper_.empty() ? 0 : upper_.back();
      upper_.push_back(lo + v.weight_bp);
      order_.push_back(static_cast<std::uint32_t>(i));
    }
  }
  salted_state_ = salted(policy_.salt);
}

std::uint32_t Router::bucket(std::string_view entity_id) const noexcept {
  return static_cast<std::uint32_t>(fmix64(fnv1a(salted_state_, entity_id)) % kBasisPoints);
}

std::uint32_t Router::route(std::string_view entity_id) const noexcept {
  const std::uint32_t b = bucket(entity_id);
  std::size_t i = 0;
  while (b >= upper_[i]) ++i;  // upper_.back() == 10000 > b, so this stops in range
  return order_[i];
}

void Router::route_many(std::span<const std::string_view> ids, std::uint32_t* out) const noexcept {
  for (std::size_t i = 0; i < ids.size(); ++i) out[i] = route(ids[i]);
}

}  // namespace carrara::core
