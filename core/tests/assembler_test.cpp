// Assembler: spec validation, assembly against hand-computed rows, overrides, plan + fill.
#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "carrara/core/assembler.hpp"
#include "carrara/core/clock.hpp"
#include "test_util.hpp"

namespace carrara::core {
namespace {

using testing::expect_error;

// user v2: [age, spend, clicks]; item v1: [price, spend]. "spend" is in both groups.
AssemblerSpec spec() {
  AssemblerSpec s;
  s.groups = {GroupSchema{"user", 2, {"age", "spend", "clicks"}}, GroupSchema{"item", 1, {"price", "spend"}}};
  s.features = {FeatureRef{"user", "age", -1.0f}, FeatureRef{"user", "spend", 0.0f},
                FeatureRef{"item", "spend", 0.5f}, FeatureRef{"item", "price", 9.0f},
                FeatureRef{"user", "clicks", 7.0f}};
  return s;
}

DecodedVector vec(std::string group, std::uint32_t version, std::string entity, std::vector<float> values,
                  std::vector<std::uint8_t> missing = {}) {
  DecodedVector v;
  v.group = std::move(group);
  v.group_version = version;
  v.entity_id = std::move(entity);
  if (missing.empty()) missing.assign(values.size(), 0);
  v.values = std::move(values);
  v.missing = std::move(missing);
  return v;
}

TEST(Assembler, ColumnsAndNames) {
  Assembler a(spec());
  EXPECT_EQ(a.dim(), 5u);
  EXPECT_EQ(a.group_count(), 2u);
  EXPECT_EQ(a.column_names(),
            (std::vector<std::string>{"age", "user.spend", "item.spend", "price", "clicks"}));
  EXPECT_EQ(a.column_index("age"), 0u);
  EXPECT_EQ(a.column_index("user.age"), 0u);
  EXPECT_EQ(a.column_index("user.spend"), 1u);
  EXPECT_EQ(a.column_index("item.spend"), 2u);
  EXPECT_EQ(a.column_index("spend"), std::nullopt);  // ambiguous
  EXPECT_EQ(a.column_index("nope"), std::nullopt);
  EXPECT_EQ(a.key(0, "u-42"), "user:2:u-42");
  EXPECT_EQ(a.key(1, "i-7"), "item:1:i-7");
  EXPECT_EQ(a.key(1, ""), "item:1:");
}

TEST(Assembler, SpecValidation) {
  {
    AssemblerSpec s = spec();
    s.features.push_back(FeatureRef{"usr", "age", 0});
    expect_error([&] { Assembler a(s); }, ErrorCode::kInvalidArgument, {"'usr'", "known: user, item"});
  }
  {
    AssemblerSpec s = spec();
    s.features.push_back(FeatureRef{"item", "colour", 0});
    expect_error([&] { Assembler a(s); }, ErrorCode::kInvalidArgument,
                 {"'item'", "'colour'", "known: price, spend"});
  }
  {
    AssemblerSpec s = spec();
    s.features.push_back(FeatureRef{"user", "age", 3});
    expect_error([&] { Assembler a(s); }, ErrorCode::kInvalidArgument, {"'user.age'", "twice"});
  }
  {
    AssemblerSpec s = spec();
    s.groups.push_back(GroupSchema{"user", 3, {"x"}});
    expect_error([&] { Assembler a(s); }, ErrorCode::kInvalidArgument, {"'user'", "twice"});
  }
  {
    AssemblerSpec s = spec();
    s.groups[1].features.push_back("price");
    expect_error([&] { Assembler a(s); }, ErrorCode::kInvalidArgument, {"'item'", "'price'", "twice"});
  }
  {
    AssemblerSpec s = spec();
    s.groups.push_back(GroupSchema{"a:b", 1, {"x"}});
    expect_error([&] { Assembler a(s); }, ErrorCode::kInvalidArgument, {"'a:b'", "':'"});
  }
  {
    AssemblerSpec s = spec();
    s.groups.push_back(GroupSchema{"", 1, {"x"}});
    expect_error([&] { Assembler a(s); }, ErrorCode::kInvalidArgument, {"non-empty"});
  }
  {
    AssemblerSpec s = spec();
    s.groups.clear();
    expect_error([&] { Assembler a(s); }, ErrorCode::kInvalidArgument, {"no groups"});
  }
  {
    AssemblerSpec s = spec();
    s.features.clear();
    expect_error([&] { Assembler a(s); }, ErrorCode::kInvalidArgument, {"no features"});
  }
}

// Three entities: e0 has both groups (user.spend missing), e1 no user row, e2 a short user
// vector (age only) and no item row.
struct Batch {
  DecodedVector u0 = vec("user", 2, "e0", {30.0f, 99.0f, 4.0f}, {0, 1, 0});
  DecodedVector u2 = vec("user", 2, "e2", {41.0f});
  DecodedVector i0 = vec("item", 1, "e0", {12.5f, 3.0f});
  DecodedVector i1 = vec("item", 1, "e1", {20.0f, 6.0f}, {1, 0});
  std::vector<const DecodedVector*> ptrs() const { return {&u0, nullptr, &u2, &i0, &i1, nullptr}; }
};

// columns: age(-1) user.spend(0) item.spend(0.5) price(9) clicks(7)
const std::vector<float> kExpected = {
    30.0f, 0.0f, 3.0f, 12.5f, 4.0f,  // e0
    -1.0f, 0.0f, 6.0f, 9.0f,  7.0f,  // e1
    41.0f, 0.0f, 0.5f, 9.0f,  7.0f,  // e2
};
const std::vector<std::uint8_t> kExpectedMask = {
    0, 1, 0, 0, 0,  //
    1, 1, 0, 1, 1,  //
    0, 1, 1, 1, 1,  //
};

TEST(Assembler, AssembleMatchesHandComputedRows) {
  Assembler a(spec());
  Batch b;
  auto ptrs = b.ptrs();
  std::vector<float> out(15, -123.0f);
  std::vector<std::uint8_t> mask(15, 9);
  a.assemble(ptrs, 3, out.data(), mask.data());
  EXPECT_EQ(out, kExpected);
  EXPECT_EQ(mask, kExpectedMask);
}

TEST(Assembler, HandBuiltVectorWithoutMask) {
  // encode_feature_vector() accepts an empty mask as "nothing missing"; so must assembly.
  Assembler a(spec());
  DecodedVector u;
  u.group = "user";
  u.group_version = 2;
  u.values = {1.0f, 2.0f};  // clicks absent: short vector
  EXPECT_TRUE(u.present(0));
  EXPECT_TRUE(u.present(1));
  EXPECT_FALSE(u.present(2));
  DecodedVector i = vec("item", 1, "e", {5.0f, 6.0f}, {0, 1});
  i.missing.resize(1);  // shorter than values: the rest count as present
  EXPECT_TRUE(i.present(1));
  std::vector<const DecodedVector*> ptrs = {&u, &i};
  std::vector<float> out(5);
  std::vector<std::uint8_t> mask(5);
  a.assemble(ptrs, 1, out.data(), mask.data());
  EXPECT_EQ(out, (std::vector<float>{1.0f, 2.0f, 6.0f, 5.0f, 7.0f}));
  EXPECT_EQ(mask, (std::vector<std::uint8_t>{0, 0, 0, 0, 1}));
}

TEST(Assembler, PlanOfTheWrongShapeIsRejected) {
  Assembler a(spec());
  Plan p;
  p.n = 2;
  p.vectors.resize(3);
  std::vector<float> out(10);
  std::vector<std::uint8_t> mask(10);
  expect_error([&] { a.assemble(p, out.data(), mask.data()); }, ErrorCode::kInvalidArgument,
               {"3 vectors", "2 groups x 2"});
}

TEST(Assembler, AssembleChecksVectorCount) {
  Assembler a(spec());
  Batch b;
  auto ptrs = b.ptrs();
  std::vector<float> out(15);
  std::vector<std::uint8_t> mask(15);
  expect_error([&] { a.assemble(std::span(ptrs).first(5), 3, out.data(), mask.data()); },
               ErrorCode::kInvalidArgument, {"5 vectors", "2 groups x 3"});
  a.assemble(std::span<const DecodedVector* const>(), 0, out.data(), mask.data());  // n = 0
}

TEST(Assembler, Overrides) {
  Assembler a(spec());
  Batch b;
  auto ptrs = b.ptrs();
  std::vector<float> out(15);
  std::vector<std::uint8_t> mask(15);
  a.assemble(ptrs, 3, out.data(), mask.data());
  const std::vector<Override> ov = {Override{4, {42.0f}}, Override{3, {1.0f, 2.0f, 3.0f}}};
  a.apply_overrides(ov, 3, out.data(), mask.data());
  std::vector<float> want = kExpected;
  std::vector<std::uint8_t> want_mask = kExpectedMask;
  for (std::size_t i = 0; i < 3; ++i) {
    want[i * 5 + 4] = 42.0f;
    want_mask[i * 5 + 4] = 0;
    want[i * 5 + 3] = static_cast<float>(i + 1);
    want_mask[i * 5 + 3] = 0;
  }
  EXPECT_EQ(out, want);
  EXPECT_EQ(mask, want_mask);

  // A bad override anywhere in the list changes nothing.
  const std::vector<Override> bad_len = {Override{0, {5.0f}}, Override{1, {1.0f, 2.0f}}};
  expect_error([&] { a.apply_overrides(bad_len, 3, out.data(), mask.data()); }, ErrorCode::kInvalidArgument,
               {"'user.spend'", "2 values", "1 or 3"});
  const std::vector<Override> empty = {Override{0, {}}};
  expect_error([&] { a.apply_overrides(empty, 3, out.data(), mask.data()); }, ErrorCode::kInvalidArgument,
               {"0 values"});
  const std::vector<Override> bad_col = {Override{0, {5.0f}}, Override{5, {1.0f}}};
  expect_error([&] { a.apply_overrides(bad_col, 3, out.data(), mask.data()); }, ErrorCode::kInvalidArgument,
               {"column 5", "dim 5"});
  EXPECT_EQ(out, want);
  EXPECT_EQ(mask, want_mask);
}

TEST(Assembler, CheckVector) {
  Assembler a(spec());
  a.check_vector(0, vec("user", 2, "e", {1, 2, 3}));
  a.check_vector(0, vec("user", 2, "e", {}));  // short is fine: the rest take defaults
  expect_error([&] { a.check_vector(0, vec("user", 3, "e", {1})); }, ErrorCode::kDecode,
               {"'user' v3", "expected 'user' v2"});
  expect_error([&] { a.check_vector(1, vec("user", 2, "e", {1})); }, ErrorCode::kDecode,
               {"expected 'item' v1"});
  expect_error([&] { a.check_vector(1, vec("item", 1, "e", {1, 2, 3})); }, ErrorCode::kDecode,
               {"3 values", "2 features"});
}

struct PlanFixture {
  std::shared_ptr<ManualClock> clock = std::make_shared<ManualClock>(0);
  FeatureCache cache{CacheOptions{100, 1'000'000, 4}, clock};
  Assembler a{spec()};
  Batch b;
  std::vector<std::string_view> ids = {"e0", "e1", "e2"};
};

TEST(Assembler, PlanFillAssembleThroughCache) {
  PlanFixture f;
  Plan p = f.a.plan(f.cache, f.ids);
  EXPECT_EQ(p.n, 3u);
  EXPECT_EQ(p.miss_keys, (std::vector<std::string>{"user:2:e0", "user:2:e1", "user:2:e2", "item:1:e0",
                                                   "item:1:e1", "item:1:e2"}));
  EXPECT_EQ(p.miss_slots, (std::vector<std::uint32_t>{0, 1, 2, 3, 4, 5}));
  const std::vector<std::string> bytes = {encode_feature_vector(f.b.u0), encode_feature_vector(f.b.u2),
                                          encode_feature_vector(f.b.i0), encode_feature_vector(f.b.i1)};
  const std::vector<std::optional<std::string_view>> values = {bytes[0], std::nullopt, bytes[1],
                                                               bytes[2], bytes[3],     std::nullopt};
  f.a.fill(p, values, &f.cache);
  EXPECT_EQ(f.cache.size(), 4u);
  EXPECT_TRUE(f.cache.contains("user:2:e0"));
  EXPECT_TRUE(f.cache.contains("item:1:e1"));
  std::vector<float> out(15);
  std::vector<std::uint8_t> mask(15);
  f.a.assemble(p, out.data(), mask.data());
  EXPECT_EQ(out, kExpected);
  EXPECT_EQ(mask, kExpectedMask);

  // Second plan: the four stored rows are hits; absent rows are not cached, so asked again.
  Plan p2 = f.a.plan(f.cache, f.ids);
  EXPECT_EQ(p2.miss_keys, (std::vector<std::string>{"user:2:e1", "item:1:e2"}));
  EXPECT_EQ(p2.miss_slots, (std::vector<std::uint32_t>{1, 5}));
  std::vector<float> out2(15);
  std::vector<std::uint8_t> mask2(15);
  f.a.assemble(p2, out2.data(), mask2.data());
  EXPECT_EQ(out2, kExpected);
  EXPECT_EQ(mask2, kExpectedMask);
}

TEST(Assembler, SecondPlanAllHits) {
  PlanFixture f;
  std::vector<std::string_view> ids = {"e0"};
  Plan p = f.a.plan(f.cache, ids);
  ASSERT_EQ(p.miss_keys, (std::vector<std::string>{"user:2:e0", "item:1:e0"}));
  const std::string u = encode_feature_vector(f.b.u0), i = encode_feature_vector(f.b.i0);
  const std::vector<std::optional<std::string_view>> values = {u, i};
  f.a.fill(p, values, &f.cache);
  const CacheStats before = f.cache.stats();
  Plan p2 = f.a.plan(f.cache, ids);
  EXPECT_TRUE(p2.miss_keys.empty());
  EXPECT_TRUE(p2.miss_slots.empty());
  EXPECT_EQ(f.cache.stats().hits, before.hits + 2);
  ASSERT_EQ(p2.vectors.size(), 2u);
  EXPECT_EQ(p2.vectors[0]->entity_id, "e0");
  EXPECT_EQ(p2.vectors[1]->group, "item");
  std::vector<float> out(5);
  std::vector<std::uint8_t> mask(5);
  f.a.assemble(p2, out.data(), mask.data());
  EXPECT_EQ(out, std::vector<float>(kExpected.begin(), kExpected.begin() + 5));
  // After the TTL the hits turn into misses again.
  f.clock->advance_ns(1'000'000);
  EXPECT_EQ(f.a.plan(f.cache, ids).miss_keys.size(), 2u);
}

TEST(Assembler, FillWithoutCache) {
  PlanFixture f;
  std::vector<std::string_view> ids = {"e0"};
  Plan p = f.a.plan(f.cache, ids);
  const std::string u = encode_feature_vector(f.b.u0);
  const std::vector<std::optional<std::string_view>> values = {u, std::nullopt};
  f.a.fill(p, values, nullptr);
  EXPECT_EQ(f.cache.size(), 0u);
  ASSERT_TRUE(p.vectors[0]);
  EXPECT_EQ(p.vectors[0]->values, f.b.u0.values);
  EXPECT_FALSE(p.vectors[1]);
}

TEST(Assembler, BadFillLeavesPlanAndCacheUntouched) {
  PlanFixture f;
  Plan p = f.a.plan(f.cache, f.ids);
  const std::string good_u = encode_feature_vector(f.b.u0);
  const std::string good_i = encode_feature_vector(f.b.i0);
  const std::string wrong_group = encode_feature_vector(f.b.i1);  // an item row in a user slot
  const std::string wrong_version = encode_feature_vector(vec("user", 1, "e2", {1}));
  const std::string too_long = encode_feature_vector(vec("item", 1, "e1", {1, 2, 3}));
  const std::string garbage = "\xff\xff\xff";
  struct Case {
    std::vector<std::optional<std::string_view>> values;
    const char* what;
  };
  const std::vector<Case> cases = {
      {{good_u, wrong_group, std::nullopt, good_i, std::nullopt, std::nullopt}, "'item' v1, expected 'user' v2"},
      {{good_u, std::nullopt, wrong_version, good_i, std::nullopt, std::nullopt}, "'user' v1"},
      {{good_u, std::nullopt, std::nullopt, good_i, too_long, std::nullopt}, "3 values"},
      {{good_u, std::nullopt, std::nullopt, good_i, std::nullopt, garbage}, "malformed"},
  };
  const CacheStats before = f.cache.stats();
  for (const Case& c : cases) {
    expect_error([&] { f.a.fill(p, c.values, &f.cache); }, ErrorCode::kDecode, {c.what});
    for (const VectorPtr& v : p.vectors) EXPECT_FALSE(v);
    EXPECT_EQ(p.miss_keys.size(), 6u);
    EXPECT_EQ(f.cache.size(), 0u);
    EXPECT_EQ(f.cache.stats().insertions, before.insertions);
  }
  const std::vector<std::optional<std::string_view>> short_values = {good_u};
  expect_error([&] { f.a.fill(p, short_values, &f.cache); }, ErrorCode::kInvalidArgument,
               {"1 values", "6 missing"});
  EXPECT_EQ(f.cache.size(), 0u);
}

TEST(Assembler, EmptyBatch) {
  PlanFixture f;
  Plan p = f.a.plan(f.cache, std::span<const std::string_view>());
  EXPECT_EQ(p.n, 0u);
  EXPECT_TRUE(p.vectors.empty());
  EXPECT_TRUE(p.miss_keys.empty());
  f.a.fill(p, std::span<const std::optional<std::string_view>>(), &f.cache);
  f.a.assemble(p, nullptr, nullptr);
}

}  // namespace
}  // namespace carrara::core
