#include "carrara/core/assembler.hpp"

#include <algorithm>
#include <unordered_set>

#include "carrara/core/error.hpp"

namespace carrara::core {

namespace {

std::string join(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& n : names) {
    if (!out.empty()) out += ", ";
    out += n;
  }
  return out;
}

}  // namespace

Assembler::Assembler(AssemblerSpec spec) : spec_(std::move(spec)) {
  if (spec_.groups.empty()) throw Error(ErrorCode::kInvalidArgument, "feature spec has no groups");
  if (spec_.features.empty()) {
    throw Error(ErrorCode::kInvalidArgument, "feature spec selects no features");
  }
  std::unordered_map<std::string, std::size_t> group_index;
  for (std::size_t g = 0; g < spec_.groups.size(); ++g) {
    const GroupSchema& gs = spec_.groups[g];
    if (gs.name.empty() || gs.name.find(':') != std::string::npos) {
      throw Error(ErrorCode::kInvalidArgument,
                  "feature group name '" + gs.name + "' must be non-empty and contain no ':'");
    }
    if (!group_index.emplace(gs.name, g).second) {
      throw Error(ErrorCode::kInvalidArgument, "feature group '" + gs.name + "' listed twice");
    }
    std::unordered_set<std::string> seen;
    for (const std::string& f : gs.features) {
      if (!seen.insert(f).second) {
        throw Error(ErrorCode::kInvalidArgument,
                    "feature group '" + gs.name + "' lists feature '" + f + "' twice");
      }
    }
    key_prefixes_.push_back(gs.name + ":" + std::to_string(gs.version) + ":");
  }
  // Count plain names to decide which columns need the "group." prefix to stay unique.
  std::unordered_map<std::string, int> name_count;
  for (const FeatureRef& ref : spec_.features) ++name_count[ref.feature];

  std::unordered_set<std::string> selected;
  for (const FeatureRef& ref : spec_.features) {
    auto git = group_index.find(ref.group);
    if (git == group_index.end()) {
      std::vector<std::string> known;
      for (const GroupSchema& gs : spec_.groups) known.push_back(gs.name);
      throw Error(ErrorCode::kInvalidArgument, "feature spec has no group '" + ref.group +
                                                   "'; known: " + join(known));
    }
    const GroupSchema& gs = spec_.groups[git->second];
    auto fit = std::find(gs.features.begin(), gs.features.end(), ref.feature);
    if (fit == gs.features.end()) {
      throw Error(ErrorCode::kInvalidArgument, "feature group '" + gs.name + "' has no feature '" +
                                                   ref.feature + "'; known: " + join(gs.features));
    }
    const std::string qualified = ref.group + "." + ref.feature;
    if (!selected.insert(qualified).second) {
      throw Error(ErrorCode::kInvalidArgument, "feature '" + qualified + "' selected twice");
    }
    const std::size_t col = columns_.size();
    columns_.push_back(Column{static_cast<std::uint32_t>(git->second),
                              static_cast<std::uint32_t>(fit - gs.features.begin()),
                              ref.default_value});
    column_names_.push_back(name_count[ref.feature] > 1 ? qualified : ref.feature);
    name_to_column_.emplace(qualified, col);
    if (name_count[ref.feature] == 1) name_to_column_.emplace(ref.feature, col);
  }
  group_begin_.assign(spec_.groups.size() + 1, 0);
  for (std::size_t g = 0; g < spec_.groups.size(); ++g) {
    group_begin_[g] = by_group_.size();
    for (std::size_t c = 0; c < columns_.size(); ++c) {
      if (columns_[c].group != g) continue;
      by_group_.push_back(GroupColumn{static_cast<std::uint32_t>(c), columns_[c].source,
                                      columns_[c].default_value});
    }
  }
  group_begin_.back() = by_group_.size();
}

std::optional<std::size_t> Assembler::column_index(std::string_view name) const {
  auto it = name_to_column_.find(std::string(name));
  if (it == name_to_column_.end()) return std::nullopt;
  return it->second;
}

std::string Assembler::key(std::size_t group, std::string_view entity_id) const {
  std::string k;
  k.reserve(key_prefixes_[group].size() + entity_id.size());
  k.append(key_prefixes_[group]);
  k.append(entity_id);
  return k;
}

void Assembler::check_vector(std::size_t g, const DecodedVector& v) const {
  const GroupSchema& gs = spec_.groups[g];
  if (v.group != gs.name || v.group_version != gs.version) {
    throw Error(ErrorCode::kDecode, "FeatureVector is for group '" + v.group + "' v" +
                                        std::to_string(v.group_version) + ", expected '" +
                                        gs.name + "' v" + std::to_string(gs.version));
  }
  if (v.values.size() > gs.features.size()) {
    throw Error(ErrorCode::kDecode, "FeatureVector has " + std::to_string(v.values.size()) +
                                        " values; group '" + gs.name + "' v" +
                                        std::to_string(gs.version) + " has " +
                                        std::to_string(gs.features.size()) + " features");
  }
}

template <class VectorAt>
void Assembler::assemble_rows(VectorAt vector_at, std::size_t n, float* out,
                              std::uint8_t* mask) const {
  const std::size_t d = columns_.size();
  const std::size_t groups = spec_.groups.size();
  for (std::size_t i = 0; i < n; ++i) {
    float* row = out + i * d;
    std::uint8_t* mrow = mask + i * d;
    for (std::size_t g = 0; g < groups; ++g) {
      const GroupColumn* begin = by_group_.data() + group_begin_[g];
      const GroupColumn* end = by_group_.data() + group_begin_[g + 1];
      const DecodedVector* v = vector_at(g, i);
      if (v == nullptr) {
        for (const GroupColumn* c = begin; c != end; ++c) {
          row[c->column] = c->default_value;
          mrow[c->column] = 1;
        }
        continue;
      }
      const std::size_t size = v->values.size();
      const float* values = v->values.data();
      const std::uint8_t* missing = v->missing.data();
      const std::size_t missing_size = v->missing.size();
      for (const GroupColumn* c = begin; c != end; ++c) {
        // As DecodedVector::present(): a hand-built vector's mask may be shorter (or empty).
        const bool present =
            c->source < size && (c->source >= missing_size || missing[c->source] == 0);
        row[c->column] = present ? values[c->source] : c->default_value;
        mrow[c->column] = present ? 0 : 1;
      }
    }
  }
}

void Assembler::assemble(std::span<const DecodedVector* const> vectors, std::size_t n, float* out,
                         std::uint8_t* mask) const {
  const std::size_t groups = spec_.groups.size();
  if (vectors.size() != groups * n) {
    throw Error(ErrorCode::kInvalidArgument,
                "assemble got " + std::to_string(vectors.size()) + " vectors for " +
                    std::to_string(groups) + " groups x " + std::to_string(n) + " entities");
  }
  assemble_rows([&](std::size_t g, std::size_t i) { return vectors[g * n + i]; }, n, out, mask);
}

void Assembler::assemble(const Plan& plan, float* out, std::uint8_t* mask) const {
  if (plan.vectors.size() != spec_.groups.size() * plan.n) {
    throw Error(ErrorCode::kInvalidArgument,
                "plan has " + std::to_string(plan.vectors.size()) + " vectors for " +
                    std::to_string(spec_.groups.size()) + " groups x " + std::to_string(plan.n) +
                    " entities");
  }
  const VectorPtr* vectors = plan.vectors.data();
  const std::size_t n = plan.n;
  assemble_rows([&](std::size_t g, std::size_t i) { return vectors[g * n + i].get(); }, n, out,
                mask);
}

void Assembler::apply_overrides(std::span<const Override> overrides, std::size_t n, float* out,
                                std::uint8_t* mask) const {
  const std::size_t d = columns_.size();
  for (const Override& o : overrides) {
    if (o.column >= d) {
      throw Error(ErrorCode::kInvalidArgument, "override column " + std::to_string(o.column) +
                                                   " out of range (dim " + std::to_string(d) + ")");
    }
    if (o.values.size() != 1 && o.values.size() != n) {
      throw Error(ErrorCode::kInvalidArgument,
                  "override for '" + column_names_[o.column] + "' has " +
                      std::to_string(o.values.size()) + " values; expected 1 or " +
                      std::to_string(n));
    }
  }
  for (const Override& o : overrides) {
    const bool scalar = o.values.size() == 1;
    for (std::size_t i = 0; i < n; ++i) {
      out[i * d + o.column] = scalar ? o.values[0] : o.values[i];
      mask[i * d + o.column] = 0;
    }
  }
}

Plan Assembler::plan(FeatureCache& cache, std::span<const std::string_view> entity_ids) const {
  Plan p;
  p.n = entity_ids.size();
  const std::size_t groups = spec_.groups.size();
  p.vectors.resize(groups * p.n);
  // One clock read for the whole batch: every lookup sees the same instant.
  const std::int64_t now = cache.clock().now_ns();
  std::string k;
  for (std::size_t g = 0; g < groups; ++g) {
    for (std::size_t i = 0; i < p.n; ++i) {
      k.assign(key_prefixes_[g]);
      k.append(entity_ids[i]);
      const std::size_t slot = g * p.n + i;
      if (!cache.get(k, p.vectors[slot], now)) {
        p.miss_slots.push_back(static_cast<std::uint32_t>(slot));
        p.miss_keys.push_back(k);
      }
    }
  }
  return p;
}

void Assembler::fill(Plan& plan, std::span<const std::optional<std::string_view>> values,
                     FeatureCache* cache) const {
  if (values.size() != plan.miss_slots.size()) {
    throw Error(ErrorCode::kInvalidArgument,
                "fill got " + std::to_string(values.size()) + " values for " +
                    std::to_string(plan.miss_slots.size()) + " missing keys");
  }
  // Decode everything first so a bad value leaves the plan and the cache untouched.
  std::vector<VectorPtr> decoded(values.size());
  for (std::size_t m = 0; m < values.size(); ++m) {
    if (!values[m].has_value()) continue;
    auto v = std::make_shared<DecodedVector>();
    decode_feature_vector(*values[m], *v);
    const std::size_t g = plan.miss_slots[m] / (plan.n == 0 ? 1 : plan.n);
    check_vector(g, *v);
    decoded[m] = std::move(v);
  }
  for (std::size_t m = 0; m < values.size(); ++m) {
    if (!decoded[m]) continue;
    if (cache != nullptr) cache->put(plan.miss_keys[m], decoded[m]);
    plan.vectors[plan.miss_slots[m]] = std::move(decoded[m]);
  }
}

}  // namespace carrara::core
