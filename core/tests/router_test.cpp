// Router: policy validation, determinism, the pinned hash, canary monotonicity, split.
#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "carrara/core/router.hpp"
#include "test_util.hpp"

namespace carrara::core {
namespace {

using testing::expect_error;

RoutingPolicy policy(std::vector<VariantSpec> variants, std::string salt = "exp-7") {
  RoutingPolicy p;
  p.salt = std::move(salt);
  p.variants = std::move(variants);
  return p;
}

std::string user(std::uint64_t i) { return "user-" + std::to_string(i); }

TEST(Router, Validation) {
  expect_error([] { Router r(policy({})); }, ErrorCode::kInvalidArgument, {"at least one"});
  expect_error([] { Router r(policy({{"a", 5000, false}, {"b", 4999, false}})); },
               ErrorCode::kInvalidArgument, {"9999", "10000"});
  expect_error([] { Router r(policy({{"a", 5000, false}, {"b", 5001, false}})); },
               ErrorCode::kInvalidArgument, {"10001"});
  // Weights that overflow 32 bits when summed must not wrap around to 10000.
  expect_error([] { Router r(policy({{"a", 4'294'967'295u, false}, {"b", 10'001, false}})); },
               ErrorCode::kInvalidArgument);
  expect_error([] { Router r(policy({{"a", 5000, false}, {"a", 5000, false}})); },
               ErrorCode::kInvalidArgument, {"'a'", "twice"});
  expect_error([] { Router r(policy({{"", 10000, false}})); }, ErrorCode::kInvalidArgument, {"empty"});
  {
    RoutingPolicy p = policy({{"a", 5000, false}, {"b", 5000, false}});
    p.shadows = {"c", "b"};
    expect_error([&] { Router r(p); }, ErrorCode::kInvalidArgument, {"'b'", "shadow"});
  }
  {
    RoutingPolicy p = policy({{"a", 5000, false}, {"b", 5000, false}});
    p.fallback = "z";
    expect_error([&] { Router r(p); }, ErrorCode::kInvalidArgument, {"'z'", "not one of the variants"});
  }
  RoutingPolicy ok = policy({{"a", 10000, false}, {"b", 0, false}});
  ok.shadows = {"s"};
  ok.fallback = "b";
  Router r(ok);
  EXPECT_EQ(r.fallback_index(), 1);
  EXPECT_EQ(Router(policy({{"a", 10000, false}})).fallback_index(), -1);
}

TEST(Router, StableHashGoldenValues) {
  // Computed once from the documented algorithm (FNV-1a 64 over salt, 0x1F, id; murmur3 fmix64)
  // by an independent implementation. A change here breaks every sticky assignment in prod.
  EXPECT_EQ(stable_hash("", ""), 0x36610c0f0fbc67caULL);
  EXPECT_EQ(stable_hash("", "user-123456"), 0xed7d5fcef698ebf2ULL);
  EXPECT_EQ(stable_hash("exp-7", "user-123456"), 0x7fdfef7fc3912339ULL);
  EXPECT_EQ(stable_hash("exp-7", "user-123457"), 0x3c9499f3531e6ae6ULL);
  EXPECT_EQ(stable_hash("salt", "\xc3\xa9t\xc3\xa9"), 0x90366f9b90084fbeULL);  // UTF-8 bytes
  // The separator keeps ("ab", "c") and ("a", "bc") apart.
  EXPECT_NE(stable_hash("ab", "c"), stable_hash("a", "bc"));
}

TEST(Router, BucketIsHashModBasisPoints) {
  Router r(policy({{"a", 10000, false}}, "exp-7"));
  EXPECT_EQ(r.bucket("user-123456"), 8073u);
  EXPECT_EQ(r.bucket("user-123457"), 8278u);
  for (std::uint64_t i = 0; i < 1000; ++i) {
    EXPECT_EQ(r.bucket(user(i)), stable_hash("exp-7", user(i)) % kBasisPoints);
  }
}

TEST(Router, DeterministicAndSticky) {
  const RoutingPolicy p = policy({{"a", 3333, false}, {"b", 3333, false}, {"c", 3334, false}});
  Router r1(p), r2(p);
  std::vector<std::string> ids;
  for (std::uint64_t i = 0; i < 10'000; ++i) ids.push_back(user(i));
  std::vector<std::string_view> views(ids.begin(), ids.end());
  std::vector<std::uint32_t> many(ids.size());
  r1.route_many(views, many.data());
  int moved_by_salt = 0;
  Router other_salt(policy(p.variants, "exp-8"));
  for (std::size_t i = 0; i < ids.size(); ++i) {
    const std::uint32_t v = r1.route(ids[i]);
    EXPECT_LT(v, 3u);
    EXPECT_EQ(r1.route(ids[i]), v);
    EXPECT_EQ(r2.route(ids[i]), v);
    EXPECT_EQ(many[i], v);
    if (other_salt.route(ids[i]) != v) ++moved_by_salt;
  }
  // A new salt reshuffles about two thirds of the entities.
  EXPECT_GT(moved_by_salt, 6000);
  EXPECT_LT(moved_by_salt, 7300);
}

TEST(Router, ZeroWeightVariantNeverChosen) {
  Router r(policy({{"off", 0, false}, {"on", 10000, false}, {"off-canary", 0, true}}));
  for (std::uint64_t i = 0; i < 20'000; ++i) EXPECT_EQ(r.route(user(i)), 1u);
}

TEST(Router, CanariesTakeTheLowestBuckets) {
  // Declaration order does not matter: the canary owns [0, 500) wherever it is listed.
  Router r(policy({{"stable", 9500, false}, {"canary", 500, true}}));
  for (std::uint64_t i = 0; i < 20'000; ++i) {
    const std::string id = user(i);
    EXPECT_EQ(r.route(id), r.bucket(id) < 500 ? 1u : 0u) << id;
  }
}

TEST(Router, GrowingACanaryOnlyMovesEntitiesIntoIt) {
  Router at5(policy({{"stable", 9500, false}, {"canary", 500, true}}));
  Router at10(policy({{"stable", 9000, false}, {"canary", 1000, true}}));
  // Two stable variants and two canaries: growing canary-b leaves everything else monotone too.
  Router multi1(policy({{"a", 4700, false}, {"b", 4700, false}, {"ca", 300, true}, {"cb", 300, true}}));
  Router multi2(policy({{"a", 4500, false}, {"b", 4500, false}, {"ca", 300, true}, {"cb", 700, true}}));
  int in5 = 0, in10 = 0, moved = 0;
  for (std::uint64_t i = 0; i < 200'000; ++i) {
    const std::string id = user(i);
    const std::uint32_t before = at5.route(id), after = at10.route(id);
    if (before == 1) {
      ++in5;
      EXPECT_EQ(after, 1u) << id << " left the canary when it grew";
    }
    if (after == 1) ++in10;
    const std::uint32_t m1 = multi1.route(id), m2 = multi2.route(id);
    if (m1 == 2 || m1 == 3) {
      EXPECT_EQ(m2, m1) << id;  // canary members stay put
    }
    if (m1 != m2 && m2 == 3) ++moved;
    // Not asserted: with two stable variants both shrinking, ~2% of entities also switch between
    // "a" and "b" (the stable ranges are laid out contiguously after the canaries).
  }
  EXPECT_NEAR(in5, 10'000, 600);
  EXPECT_NEAR(in10, 20'000, 800);
  EXPECT_GT(moved, 0);
}

TEST(Router, SplitMatchesWeightsOver1MIds) {
  const std::array<double, 3> weights = {0.5, 0.3, 0.2};
  Router r(policy({{"a", 5000, false}, {"b", 3000, false}, {"c", 2000, false}}));
  constexpr int kIds = 1'000'000;
  std::array<int, 3> counts{};
  std::string id = "user-";
  for (int i = 0; i < kIds; ++i) {
    id.resize(5);
    id += std::to_string(i);
    ++counts[r.route(id)];
  }
  double chi2 = 0;
  for (std::size_t v = 0; v < 3; ++v) {
    const double expected = weights[v] * kIds;
    EXPECT_NEAR(counts[v] / static_cast<double>(kIds), weights[v], 0.005) << "variant " << v;
    chi2 += (counts[v] - expected) * (counts[v] - expected) / expected;
  }
  // Chi-squared with 2 degrees of freedom: 13.82 is the p = 0.001 critical value.
  EXPECT_LT(chi2, 13.82) << counts[0] << " " << counts[1] << " " << counts[2];
}

}  // namespace
}  // namespace carrara::core
