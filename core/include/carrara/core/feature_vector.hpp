// FeatureVector: the online-store value (proto/carrara/v1/feature_vector.proto), decoded.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace carrara::core {

struct DecodedVector {
  std::string entity_id;
  std::string group;
  std::uint32_t group_version = 0;
  std::int64_t event_timestamp_us = 0;
  std::int64_t created_timestamp_us = 0;
  std::vector<float> values;
  // One byte per value: 1 = missing. Always values.size() long after decode; a hand-built
  // vector may leave it empty (nothing missing), as encode_feature_vector() allows.
  std::vector<std::uint8_t> missing;

  bool present(std::size_t i) const noexcept {
    return i < values.size() && (i >= missing.size() || missing[i] == 0);
  }
};

using VectorPtr = std::shared_ptr<const DecodedVector>;

// Decode protobuf bytes into `out` (reusing its buffers). Throws Error(kDecode) on malformed
// input: bad wire format, or a missing-bitmap longer than the values need.
void decode_feature_vector(std::string_view bytes, DecodedVector& out);
VectorPtr decode_feature_vector(std::string_view bytes);

// Encode with the generated serializer. `missing` may be empty (nothing missing) or
// values.size() long; otherwise Error(kInvalidArgument).
std::string encode_feature_vector(const DecodedVector& v);

}  // namespace carrara::core
