// Router: deterministic, sticky traffic split across model variants.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace carrara::core {

inline constexpr std::uint32_t kBasisPoints = 10'000;

struct VariantSpec {
  std::string name;
  std::uint32_t weight_bp = 0;  // share of traffic in basis points (1/100 of a percent)
  bool canary = false;          // canaries take the lowest buckets, so growing one is monotone
};

struct RoutingPolicy {
  std::string salt;                   // change it to reshuffle who lands where
  std::vector<VariantSpec> variants;  // weights sum to 10,000
  std::vector<std::string> shadows;   // get a copy of every request, never answer it
  std::string fallback;               // answers when the chosen variant fails; "" = none
};

// A stable 64-bit hash: FNV-1a over salt, 0x1F, id, then the murmur3 finalizer.
// The same on every platform, process and restart (it is part of the stickiness contract).
std::uint64_t stable_hash(std::string_view salt, std::string_view id) noexcept;

class Router {
 public:
  explicit Router(RoutingPolicy policy);

  // Index into variants() of the variant serving `entity_id`.
  std::uint32_t route(std::string_view entity_id) const noexcept;
  void route_many(std::span<const std::string_view> ids, std::uint32_t* out) const noexcept;
  // The bucket in [0, 10000) an entity falls in.
  std::uint32_t bucket(std::string_view entity_id) const noexcept;

  const RoutingPolicy& policy() const noexcept { return policy_; }
  const std::vector<VariantSpec>& variants() const noexcept { return policy_.variants; }
  // Index of the fallback variant, or -1.
  int fallback_index() const noexcept { return fallback_index_; }

 private:
  RoutingPolicy policy_;
  std::uint64_t salted_state_;           // FNV state after salt and separator
  std::vector<std::uint32_t> upper_;     // cumulative bucket bounds in routing order
  std::vector<std::uint32_t> order_;     // routing order -> variant index
  int fallback_index_ = -1;
};

}  // namespace carrara::core
