#include "carrara/core/feature_vector.hpp"

#include <bit>
#include <climits>
#include <cstring>

#include "carrara/core/error.hpp"
#include "carrara/v1/feature_vector.pb.h"

namespace carrara::core {

namespace {

// One scratch message per thread: parsing into a reused message keeps its buffers, so a
// steady-state decode allocates nothing in protobuf.
carrara::v1::FeatureVector& scratch() {
  thread_local carrara::v1::FeatureVector msg;
  return msg;
}

// proto3 `string` fields must be UTF-8: the parser rejects anything else, so the encoder does
// too (with protobuf's own check) rather than write a value that no reader can decode.
void require_utf8(const std::string& s, const char* field) {
  if (s.size() > static_cast<std::size_t>(INT32_MAX) ||
      !google::protobuf::internal::IsStructurallyValidUTF8(s.data(), static_cast<int>(s.size()))) {
    throw Error(ErrorCode::kInvalidArgument,
                std::string("FeatureVector ") + field + " is not valid UTF-8");
  }
}

}  // namespace

void decode_feature_vector(std::string_view bytes, DecodedVector& out) {
  if (bytes.size() > static_cast<std::size_t>(INT32_MAX)) {
    throw Error(ErrorCode::kDecode, "FeatureVector larger than 2 GiB");
  }
  carrara::v1::FeatureVector& msg = scratch();
  if (!msg.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) {
    msg.Clear();
    throw Error(ErrorCode::kDecode,
                "malformed FeatureVector protobuf (" + std::to_string(bytes.size()) + " bytes)");
  }
  const std::size_t n = static_cast<std::size_t>(msg.values_size());
  const std::string& bitmap = msg.missing();
  if (bitmap.size() > (n + 7) / 8) {
    const std::size_t got = bitmap.size();
    msg.Clear();
    throw Error(ErrorCode::kDecode, "FeatureVector missing-bitmap has " + std::to_string(got) +
                                        " bytes for " + std::to_string(n) + " values");
  }
  // Validate everything before touching `out`, so a failed decode leaves it as it was. A set bit
  // past the last value can only sit in the final byte of a full-length bitmap.
  if (n % 8 != 0 && bitmap.size() == (n + 7) / 8) {
    const unsigned extra = static_cast<std::uint8_t>(bitmap.back()) >> (n % 8);
    if (extra != 0) {
      const std::size_t i = n + static_cast<std::size_t>(std::countr_zero(extra));
      msg.Clear();
      throw Error(ErrorCode::kDecode, "FeatureVector marks value " + std::to_string(i) +
                                          " missing but has only " + std::to_string(n));
    }
  }
  out.entity_id.assign(msg.entity_id());
  out.group.assign(msg.group());
  out.group_version = msg.group_version();
  out.event_timestamp_us = msg.event_timestamp_us();
  out.created_timestamp_us = msg.created_timestamp_us();
  out.values.resize(n);
  if (n != 0) std::memcpy(out.values.data(), msg.values().data(), n * sizeof(float));
  out.missing.assign(n, 0);
  for (std::size_t b = 0; b < bitmap.size(); ++b) {
    const auto byte = static_cast<std::uint8_t>(bitmap[b]);
    if (byte == 0) continue;
    for (std::size_t bit = 0; bit < 8; ++bit) {
      if ((byte >> bit) & 1U) out.missing[b * 8 + bit] = 1;  // < n: checked above
    }
  }
}

VectorPtr decode_feature_vector(std::string_view bytes) {
  auto v = std::make_shared<DecodedVector>();
  decode_feature_vector(bytes, *v);
  return v;
}

std::string encode_feature_vector(const DecodedVector& v) {
  if (!v.missing.empty() && v.missing.size() != v.values.size()) {
    throw Error(ErrorCode::kInvalidArgument,
                "missing mask has " + std::to_string(v.missing.size()) + " entries for " +
                    std::to_string(v.values.size()) + " values");
  }
  require_utf8(v.entity_id, "entity_id");
  require_utf8(v.group, "group");
  carrara::v1::FeatureVector msg;
  msg.set_entity_id(v.entity_id);
  msg.set_group(v.group);
  msg.set_group_version(v.group_version);
  msg.set_event_timestamp_us(v.event_timestamp_us);
  msg.set_created_timestamp_us(v.created_timestamp_us);
  msg.mutable_values()->Add(v.values.begin(), v.values.end());
  std::size_t last = 0;  // bytes needed: up to the last missing value
  for (std::size_t i = 0; i < v.missing.size(); ++i) {
    if (v.missing[i]) last = i / 8 + 1;
  }
  if (last != 0) {
    std::string bitmap(last, '\0');
    for (std::size_t i = 0; i < v.missing.size(); ++i) {
      if (v.missing[i]) bitmap[i / 8] = static_cast<char>(bitmap[i / 8] | (1U << (i % 8)));
    }
    msg.set_missing(std::move(bitmap));
  }
  return msg.SerializeAsString();
}

}  // namespace carrara::core
