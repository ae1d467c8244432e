#include "kserve_codec.hpp"

#include <grpcpp/support/proto_buffer_reader.h>
#include <grpcpp/support/slice.h>

#include <bit>
#include <cstring>
#include <limits>
#include <optional>

namespace carrara::server::detail {

namespace {

using core::ErrorCode;

[[noreturn]] void invalid(std::string message) {
  throw core::Error(ErrorCode::kInvalidArgument, std::move(message));
}

std::string quoted(std::string_view s) { return "'" + std::string(s) + "'"; }

// Product of a tensor shape; nullopt on a negative dimension or overflow (never a match).
std::optional<std::uint64_t> element_count(const google::protobuf::RepeatedField<std::int64_t>& shape) {
  if (shape.empty()) return 0;  // as the Python front: an empty shape holds nothing
  std::uint64_t n = 1;
  for (std::int64_t d : shape) {
    if (d < 0) return std::nullopt;
    const auto u = static_cast<std::uint64_t>(d);
    if (u != 0 && n > std::numeric_limits<std::uint64_t>::max() / u) return std::nullopt;
    n *= u;
  }
  return n;
}

std::uint32_t load_u32_le(const char* p) noexcept {
  const auto* b = reinterpret_cast<const unsigned char*>(p);
  return static_cast<std::uint32_t>(b[0]) | static_cast<std::uint32_t>(b[1]) << 8 |
         static_cast<std::uint32_t>(b[2]) << 16 | static_cast<std::uint32_t>(b[3]) << 24;
}

// Little-endian float32s -> floats.
void load_f32_le(std::string_view raw, std::vector<float>& out) {
  out.resize(raw.size() / 4);
  if constexpr (std::endian::native == std::endian::little) {
    if (!out.empty()) std::memcpy(out.data(), raw.data(), out.size() * 4);
  } else {
    for (std::size_t i = 0; i < out.size(); ++i) {
      out[i] = std::bit_cast<float>(load_u32_le(raw.data() + 4 * i));
    }
  }
}

void store_f32_le(const std::vector<float>& in, std::string& out) {
  out.resize(in.size() * 4);
  if constexpr (std::endian::native == std::endian::little) {
    if (!in.empty()) std::memcpy(out.data(), in.data(), out.size());
  } else {
    for (std::size_t i = 0; i < in.size(); ++i) {
      const auto u = std::bit_cast<std::uint32_t>(in[i]);
      for (int b = 0; b < 4; ++b) out[4 * i + b] = static_cast<char>((u >> (8 * b)) & 0xFF);
    }
  }
}

}  // namespace

bool valid_utf8(std::string_view s) noexcept {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const auto* end = p + s.size();
  while (p < end) {
    const unsigned char c = *p;
    if (c < 0x80) {
      ++p;
      continue;
    }
    std::size_t len;
    std::uint32_t cp;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
      cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      cp = c & 0x07;
    } else {
      return false;  // continuation byte first, overlong 2-byte lead (C0/C1) or past F4
    }
    if (static_cast<std::size_t>(end - p) < len) return false;
    for (std::size_t i = 1; i < len; ++i) {
      if ((p[i] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[i] & 0x3F);
    }
    if ((len == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
        (len == 4 && (cp < 0x10000 || cp > 0x10FFFF))) {
      return false;
    }
    p += len;
  }
  return true;
}

void decode_bytes_tensor(std::string_view raw, std::vector<std::string>& out) {
  std::size_t offset = 0;
  while (offset < raw.size()) {
    if (raw.size() - offset < 4) invalid("truncated BYTES tensor (length prefix cut off)");
    const std::uint32_t size = load_u32_le(raw.data() + offset);
    offset += 4;
    if (raw.size() - offset < size) invalid("truncated BYTES tensor (element cut off)");
    std::string_view element = raw.substr(offset, size);
    if (!valid_utf8(element)) invalid("entity ids must be UTF-8");
    out.emplace_back(element);
    offset += size;
  }
}

std::string shape_text(const google::protobuf::RepeatedField<std::int64_t>& shape) {
  std::string s = "[";
  for (int i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape.Get(i));
  }
  s += "]";
  return s;
}

core::PredictCall decode_infer_request(const inference::ModelInferRequest& request) {
  core::PredictCall call;
  call.model = request.model_name();
  call.version = request.model_version();
  call.request_id = request.id();
  const auto& raw = request.raw_input_contents();
  const bool use_raw = !raw.empty();
  if (use_raw && raw.size() != request.inputs_size()) {
    invalid("raw_input_contents must have one entry per input");
  }
  bool have_entities = false;
  for (int i = 0; i < request.inputs_size(); ++i) {
    const auto& tensor = request.inputs(i);
    const std::optional<std::uint64_t> expected = element_count(tensor.shape());
    if (tensor.name() == kEntityInput) {
      if (tensor.datatype() != "BYTES") {
        invalid("input " + quoted(kEntityInput) + " must be BYTES, got " + tensor.datatype());
      }
      call.entity_ids.clear();
      if (use_raw) {
        if (expected) call.entity_ids.reserve(std::min<std::uint64_t>(*expected, raw.Get(i).size() / 4));
        decode_bytes_tensor(raw.Get(i), call.entity_ids);
      } else {
        const auto& contents = tensor.contents().bytes_contents();
        call.entity_ids.reserve(static_cast<std::size_t>(contents.size()));
        for (const std::string& b : contents) {
          if (!valid_utf8(b)) invalid("entity ids must be UTF-8");
          call.entity_ids.push_back(b);
        }
      }
      if (!expected || *expected != call.entity_ids.size()) {
        invalid("input " + quoted(kEntityInput) + " has shape " + shape_text(tensor.shape()) +
                " but " + std::to_string(call.entity_ids.size()) + " elements");
      }
      have_entities = true;
      continue;
    }
    if (tensor.datatype() != "FP32") {
      invalid("override input " + quoted(tensor.name()) + " must be FP32, got " + tensor.datatype());
    }
    core::OverrideInput o;
    o.name = tensor.name();
    if (use_raw) {
      const std::string& bytes = raw.Get(i);
      if (bytes.size() % 4 != 0) {
        invalid("override input " + quoted(tensor.name()) + " has " + std::to_string(bytes.size()) +
                " bytes of raw data; FP32 needs a multiple of 4");
      }
      load_f32_le(bytes, o.values);
    } else {
      const auto& fp32 = tensor.contents().fp32_contents();
      o.values.assign(fp32.begin(), fp32.end());
    }
    if (!expected || *expected != o.values.size()) {
      invalid("override input " + quoted(tensor.name()) + " has shape " +
              shape_text(tensor.shape()) + " but " + std::to_string(o.values.size()) + " elements");
    }
    // A name given twice: the last one wins (as the Python front's dict did).
    bool replaced = false;
    for (core::OverrideInput& existing : call.overrides) {
      if (existing.name == o.name) {
        existing = std::move(o);
        replaced = true;
        break;
      }
    }
    if (!replaced) call.overrides.push_back(std::move(o));
  }
  if (!have_entities) {
    invalid("ModelInfer needs a BYTES input named " + quoted(kEntityInput));
  }
  for (const auto& out : request.outputs()) {
    if (out.name() != kOutputName) {
      invalid("unknown output " + quoted(out.name()) + "; this model has " + quoted(kOutputName));
    }
  }
  return call;
}

void encode_infer_response(const core::PredictOutcome& outcome, const std::string& model_name,
                           const std::string& id, inference::ModelInferResponse& out) {
  const std::size_t n = outcome.outputs.rows;
  out.set_model_name(model_name);
  if (n > 0 && !outcome.variant.empty()) {
    out.set_model_version(std::to_string(outcome.variants[outcome.variant[0]].version));
  }
  out.set_id(id);
  auto* tensor = out.add_outputs();
  tensor->set_name(std::string(kOutputName));
  tensor->set_datatype("FP32");
  tensor->add_shape(static_cast<std::int64_t>(n));
  tensor->add_shape(static_cast<std::int64_t>(outcome.outputs.cols));
  store_f32_le(outcome.outputs.data, *out.add_raw_output_contents());
  std::string variants;
  for (std::size_t i = 0; i < outcome.variant.size(); ++i) {
    if (i) variants += ',';
    variants += outcome.variants[outcome.variant[i]].name;
  }
  auto& params = *out.mutable_parameters();
  params["carrara_variants"].set_string_param(std::move(variants));
  params["carrara_degraded"].set_bool_param(outcome.any_degraded());
}

core::PredictCall decode_predict_request(const carrara::v1::PredictRequest& request) {
  core::PredictCall call;
  call.model = request.model();
  call.entity_ids.assign(request.entity_ids().begin(), request.entity_ids().end());
  call.overrides.reserve(static_cast<std::size_t>(request.overrides_size()));
  for (const auto& o : request.overrides()) {
    call.overrides.push_back(core::OverrideInput{o.name(), {o.values().begin(), o.values().end()}});
  }
  call.request_id = request.request_id();
  return call;
}

void encode_predict_response(const core::PredictOutcome& outcome,
                             carrara::v1::PredictRequest& request,
                             carrara::v1::PredictResponse& out) {
  const std::size_t n = outcome.outputs.rows;
  const std::size_t k = outcome.outputs.cols;
  out.set_model(outcome.model);
  out.set_request_id(outcome.request_id);
  out.set_latency_us(static_cast<std::uint64_t>(outcome.latency_us));
  out.mutable_predictions()->Reserve(static_cast<int>(n));
  bool degraded = false;
  for (std::size_t i = 0; i < n; ++i) {
    const core::VariantId& v = outcome.variants[outcome.variant[i]];
    auto* p = out.add_predictions();
    if (i < static_cast<std::size_t>(request.entity_ids_size())) {
      p->set_entity_id(std::move(*request.mutable_entity_ids(static_cast<int>(i))));
    }
    p->mutable_values()->Add(outcome.outputs.row(i), outcome.outputs.row(i) + k);
    p->set_variant(v.name);
    p->set_model_version(v.version);
    const bool d = i < outcome.degraded.size() && outcome.degraded[i] != 0;
    p->set_degraded(d);
    degraded = degraded || d;
  }
  if (n > 0) {
    const core::VariantId& first = outcome.variants[outcome.variant[0]];
    out.set_model_version(first.version);
    out.set_variant(first.name);
  }
  out.set_degraded(degraded);
}

bool parse(const grpc::ByteBuffer& buffer, google::protobuf::MessageLite& message) {
  if (!buffer.Valid()) {  // an empty payload
    message.Clear();
    return true;
  }
  grpc::Slice slice;
  if (buffer.TrySingleSlice(&slice).ok()) {
    if (slice.size() > static_cast<std::size_t>(std::numeric_limits<int>::max())) return false;
    return message.ParseFromArray(slice.begin(), static_cast<int>(slice.size()));
  }
  // Several slices: read them in place. The reader does not modify the buffer.
  grpc::ProtoBufferReader reader(const_cast<grpc::ByteBuffer*>(&buffer));
  if (!reader.status().ok()) return false;
  return message.ParseFromZeroCopyStream(&reader);
}

void serialize(const google::protobuf::MessageLite& message, grpc::ByteBuffer& out) {
  const std::size_t size = message.ByteSizeLong();
  grpc::Slice slice(size);
  message.SerializeWithCachedSizesToArray(const_cast<std::uint8_t*>(slice.begin()));
  grpc::ByteBuffer tmp(&slice, 1);
  out.Swap(&tmp);
}

}  // namespace carrara::server::detail
