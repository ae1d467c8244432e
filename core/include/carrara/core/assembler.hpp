// Assembler: decoded feature vectors of several groups -> one contiguous float32 [n, d] tensor.
//
// Built once from a feature spec; hot calls take raw pointers and write into caller buffers.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "carrara/core/cache.hpp"
#include "carrara/core/feature_vector.hpp"

namespace carrara::core {

// One feature-group version: its features in the order its FeatureVector values use.
struct GroupSchema {
  std::string name;
  std::uint32_t version = 0;
  std::vector<std::string> features;
};

// One output column: a feature of a group, and the value used when it is missing.
struct FeatureRef {
  std::string group;
  std::string feature;
  float default_value = 0.0f;
};

struct AssemblerSpec {
  std::vector<GroupSchema> groups;
  std::vector<FeatureRef> features;  // output column order
};

// A request override: column `column` takes `values[0]` for every row (size 1) or values[i].
struct Override {
  std::size_t column;
  std::vector<float> values;
};

// The lookups for one batch of entities: which vectors came from the cache and which keys
// still have to be fetched from the online store.
struct Plan {
  std::size_t n = 0;                    // entities
  std::vector<VectorPtr> vectors;       // groups x n, group-major; null = not (yet) known
  std::vector<std::uint32_t> miss_slots;  // index into `vectors` of each miss
  std::vector<std::string> miss_keys;   // online-store key of each miss
};

class Assembler {
 public:
  explicit Assembler(AssemblerSpec spec);

  std::size_t dim() const noexcept { return columns_.size(); }
  std::size_t group_count() const noexcept { return spec_.groups.size(); }
  const AssemblerSpec& spec() const noexcept { return spec_; }
  // Output column names: the feature name, or "group.feature" where two groups share a name.
  const std::vector<std::string>& column_names() const noexcept { return column_names_; }
  // Column of a name ("feature" or "group.feature"); nullopt when unknown.
  std::optional<std::size_t> column_index(std::string_view name) const;

  // "{group}:{version}:{entity_id}": the online-store and cache key (Redis Cluster safe).
  std::string key(std::size_t group, std::string_view entity_id) const;

  // vectors: group_count() x n pointers, group-major; nullptr = no row for that entity.
  // Writes out[n * dim] and mask[n * dim] (1 = the default was used).
  void assemble(std::span<const DecodedVector* const> vectors, std::size_t n, float* out,
                std::uint8_t* mask) const;
  void assemble(const Plan& plan, float* out, std::uint8_t* mask) const;
  void apply_overrides(std::span<const Override> overrides, std::size_t n, float* out,
                       std::uint8_t* mask) const;

  // Looks every (group, entity) up in the cache and lists what is missing.
  Plan plan(FeatureCache& cache, std::span<const std::string_view> entity_ids) const;
  // Decodes the fetched values of plan.miss_keys (nullopt = absent in the store), checks they
  // belong to the right group version, and stores them in the plan and the cache.
  void fill(Plan& plan, std::span<const std::optional<std::string_view>> values,
            FeatureCache* cache) const;

  // Checks a decoded vector against group `g`'s schema; throws Error(kDecode) when it does not fit.
  void check_vector(std::size_t g, const DecodedVector& v) const;

 private:
  struct Column {
    std::uint32_t group;
    std::uint32_t source;  // index into the group's values
    float default_value;
  };

  // The columns again, grouped by source group: assembly looks at each group's vector once
  // per row and then fills that group's columns.
  struct GroupColumn {
    std::uint32_t column;
    std::uint32_t source;
    float default_value;
  };

  // vector_at(g, i): the vector of group g for entity i, or nullptr.
  template <class VectorAt>
  void assemble_rows(VectorAt vector_at, std::size_t n, float* out, std::uint8_t* mask) const;

  AssemblerSpec spec_;
  std::vector<Column> columns_;
  std::vector<GroupColumn> by_group_;
  std::vector<std::size_t> group_begin_;  // group_count() + 1 offsets into by_group_
  std::vector<std::string> column_names_;
  std::unordered_map<std::string, std::size_t> name_to_column_;
  std::vector<std::string> key_prefixes_;  // "{group}:{version}:" per group
};

}  // namespace carrara::core
