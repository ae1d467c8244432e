// The wire <-> engine conversions on their own (no server): BYTES tensors, UTF-8, tensor
// checks and their error texts, payload parsing across slices.
#include <gtest/gtest.h>
#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/slice.h>

#include <cstring>

#include "carrara/server/status.hpp"
#include "kserve_codec.hpp"

namespace carrara::server {
namespace {

using core::ErrorCode;

std::string bytes_tensor(std::initializer_list<std::string_view> items) {
  std::string out;
  for (std::string_view s : items) {
    const auto n = static_cast<std::uint32_t>(s.size());
    for (int b = 0; b < 4; ++b) out.push_back(static_cast<char>((n >> (8 * b)) & 0xFF));
    out.append(s);
  }
  return out;
}

std::string f32(std::initializer_list<float> values) {
  std::string out(values.size() * 4, '\0');
  std::memcpy(out.data(), std::data(values), out.size());
  return out;
}

// Runs fn, expects core::Error(kInvalidArgument) whose message contains `part`.
template <class Fn>
void expect_invalid(Fn&& fn, std::string_view part) {
  try {
    fn();
    ADD_FAILURE() << "did not throw; expected: " << part;
  } catch (const core::Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << e.what();
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos)
        << "'" << part << "' not in: " << e.what();
  }
}

inference::ModelInferRequest request_with_ids(std::initializer_list<std::string_view> ids) {
  inference::ModelInferRequest r;
  r.set_model_name("scorer");
  auto* t = r.add_inputs();
  t->set_name("entity_ids");
  t->set_datatype("BYTES");
  t->add_shape(static_cast<std::int64_t>(ids.size()));
  r.add_raw_input_contents(bytes_tensor(ids));
  return r;
}

TEST(StatusMap, EveryCodeHasItsGrpcCode) {
  using grpc::StatusCode;
  const std::pair<ErrorCode, StatusCode> cases[] = {
      {ErrorCode::kOk, StatusCode::OK},
      {ErrorCode::kInvalidArgument, StatusCode::INVALID_ARGUMENT},
      {ErrorCode::kNotFound, StatusCode::NOT_FOUND},
      {ErrorCode::kDecode, StatusCode::INVALID_ARGUMENT},
      {ErrorCode::kResourceExhausted, StatusCode::RESOURCE_EXHAUSTED},
      {ErrorCode::kFailedPrecondition, StatusCode::FAILED_PRECONDITION},
      {ErrorCode::kInternal, StatusCode::INTERNAL},
      {ErrorCode::kCancelled, StatusCode::CANCELLED},
      {ErrorCode::kDeadlineExceeded, StatusCode::DEADLINE_EXCEEDED},
      {ErrorCode::kUnavailable, StatusCode::UNAVAILABLE},
  };
  static_assert(std::size(cases) == core::kErrorCodeCount);
  for (const auto& [code, expected] : cases) {
    EXPECT_EQ(grpc_code(code), expected) << core::error_code_name(code);
  }
  EXPECT_EQ(grpc_code(static_cast<ErrorCode>(999)), StatusCode::INTERNAL);
  const grpc::Status s = grpc_status(core::Status{ErrorCode::kNotFound, "model 'x' is gone"});
  EXPECT_EQ(s.error_code(), StatusCode::NOT_FOUND);
  EXPECT_EQ(s.error_message(), "model 'x' is gone");
}

TEST(Utf8, StrictAsPython) {
  using detail::valid_utf8;
  EXPECT_TRUE(valid_utf8(""));
  EXPECT_TRUE(valid_utf8("user-1"));
  EXPECT_TRUE(valid_utf8("\xc3\xa9t\xc3\xa9"));        // été
  EXPECT_TRUE(valid_utf8("\xe2\x82\xac"));             // €
  EXPECT_TRUE(valid_utf8("\xf0\x9f\x98\x80"));         // U+1F600
  EXPECT_TRUE(valid_utf8("\xf4\x8f\xbf\xbf"));         // U+10FFFF
  EXPECT_FALSE(valid_utf8("\xff"));
  EXPECT_FALSE(valid_utf8("\x80"));                    // lone continuation
  EXPECT_FALSE(valid_utf8("\xc3"));                    // cut off
  EXPECT_FALSE(valid_utf8("\xc0\xaf"));                // overlong '/'
  EXPECT_FALSE(valid_utf8("\xe0\x80\xaf"));            // overlong, 3 bytes
  EXPECT_FALSE(valid_utf8("\xed\xa0\x80"));            // surrogate U+D800
  EXPECT_FALSE(valid_utf8("\xf4\x90\x80\x80"));        // past U+10FFFF
  EXPECT_FALSE(valid_utf8("\xf0\x80\x80\x80"));        // overlong, 4 bytes
  EXPECT_FALSE(valid_utf8("\xe2\x28\xa1"));            // bad continuation
}

TEST(BytesTensor, DecodesAndRejectsTruncation) {
  std::vector<std::string> out;
  detail::decode_bytes_tensor(bytes_tensor({"u1", "", "été"}), out);
  EXPECT_EQ(out, (std::vector<std::string>{"u1", "", "été"}));
  std::string raw = bytes_tensor({"u1", "u2"});
  expect_invalid([&] {
    std::vector<std::string> o;
    detail::decode_bytes_tensor(std::string_view(raw).substr(0, raw.size() - 1), o);
  }, "truncated BYTES tensor (element cut off)");
  expect_invalid([&] {
    std::vector<std::string> o;
    detail::decode_bytes_tensor(raw + "\x01\x00", o);
  }, "truncated BYTES tensor (length prefix cut off)");
  expect_invalid([&] {
    std::vector<std::string> o;
    detail::decode_bytes_tensor(bytes_tensor({"ok", "\xff\xfe"}), o);
  }, "entity ids must be UTF-8");
  // A length larger than what is left (and than 2^31): no overflow, no huge allocation.
  expect_invalid([&] {
    std::vector<std::string> o;
    detail::decode_bytes_tensor(std::string("\xff\xff\xff\xff", 4) + "abc", o);
  }, "element cut off");
}

TEST(DecodeInfer, RawAndContents) {
  inference::ModelInferRequest r = request_with_ids({"u1", "u2", "u3"});
  r.set_model_version("3");
  r.set_id("req-1");
  auto* o = r.add_inputs();
  o->set_name("a");
  o->set_datatype("FP32");
  o->add_shape(3);
  r.add_raw_input_contents(f32({1.0f, 2.0f, 3.5f}));
  r.add_outputs()->set_name("predictions");
  core::PredictCall call = detail::decode_infer_request(r);
  EXPECT_EQ(call.model, "scorer");
  EXPECT_EQ(call.version, "3");
  EXPECT_EQ(call.request_id, "req-1");
  EXPECT_EQ(call.entity_ids, (std::vector<std::string>{"u1", "u2", "u3"}));
  ASSERT_EQ(call.overrides.size(), 1u);
  EXPECT_EQ(call.overrides[0].name, "a");
  EXPECT_EQ(call.overrides[0].values, (std::vector<float>{1.0f, 2.0f, 3.5f}));

  inference::ModelInferRequest c;
  c.set_model_name("scorer");
  auto* ids = c.add_inputs();
  ids->set_name("entity_ids");
  ids->set_datatype("BYTES");
  ids->add_shape(1);
  ids->add_shape(2);
  ids->mutable_contents()->add_bytes_contents("u7");
  ids->mutable_contents()->add_bytes_contents("u8");
  auto* b = c.add_inputs();
  b->set_name("b");
  b->set_datatype("FP32");
  b->add_shape(1);
  b->mutable_contents()->add_fp32_contents(10.0f);
  call = detail::decode_infer_request(c);
  EXPECT_EQ(call.entity_ids, (std::vector<std::string>{"u7", "u8"}));
  ASSERT_EQ(call.overrides.size(), 1u);
  EXPECT_EQ(call.overrides[0].values, (std::vector<float>{10.0f}));
}

TEST(DecodeInfer, ErrorTexts) {
  {
    auto r = request_with_ids({"u1"});
    r.mutable_inputs(0)->set_datatype("FP32");
    expect_invalid([&] { detail::decode_infer_request(r); },
                   "input 'entity_ids' must be BYTES, got FP32");
  }
  {
    auto r = request_with_ids({"u1", "u2"});
    r.mutable_inputs(0)->set_shape(0, 3);
    expect_invalid([&] { detail::decode_infer_request(r); },
                   "input 'entity_ids' has shape [3] but 2 elements");
    r.mutable_inputs(0)->set_shape(0, -1);
    expect_invalid([&] { detail::decode_infer_request(r); }, "has shape [-1] but 2 elements");
    r.mutable_inputs(0)->clear_shape();
    expect_invalid([&] { detail::decode_infer_request(r); }, "has shape [] but 2 elements");
  }
  {
    auto r = request_with_ids({"u1"});
    r.add_raw_input_contents("extra");
    expect_invalid([&] { detail::decode_infer_request(r); },
                   "raw_input_contents must have one entry per input");
  }
  {
    inference::ModelInferRequest r;
    r.set_model_name("scorer");
    expect_invalid([&] { detail::decode_infer_request(r); },
                   "ModelInfer needs a BYTES input named 'entity_ids'");
  }
  {
    auto r = request_with_ids({"u1"});
    auto* o = r.add_inputs();
    o->set_name("a");
    o->set_datatype("INT64");
    o->add_shape(1);
    r.add_raw_input_contents(std::string(8, '\0'));
    expect_invalid([&] { detail::decode_infer_request(r); },
                   "override input 'a' must be FP32, got INT64");
    o->set_datatype("FP32");
    r.set_raw_input_contents(1, std::string(7, '\0'));
    expect_invalid([&] { detail::decode_infer_request(r); }, "multiple of 4");
    r.set_raw_input_contents(1, f32({1.0f, 2.0f}));
    expect_invalid([&] { detail::decode_infer_request(r); },
                   "override input 'a' has shape [1] but 2 elements");
  }
  {
    auto r = request_with_ids({"u1"});
    r.add_outputs()->set_name("predictions");
    r.add_outputs()->set_name("scores");
    expect_invalid([&] { detail::decode_infer_request(r); },
                   "unknown output 'scores'; this model has 'predictions'");
  }
}

TEST(EncodeInfer, RawLittleEndianAndParameters) {
  core::PredictOutcome o;
  o.model = "ab";
  o.outputs = core::Matrix(2, 2);
  o.outputs.data = {1.0f, 2.0f, 3.0f, -4.5f};
  o.variants = {core::VariantId{"control", 1}, core::VariantId{"treatment", 2}};
  o.variant = {1, 0};
  o.degraded = {0, 1};
  inference::ModelInferResponse r;
  detail::encode_infer_response(o, "ab", "q9", r);
  EXPECT_EQ(r.model_name(), "ab");
  EXPECT_EQ(r.model_version(), "2");  // entity 0's
  EXPECT_EQ(r.id(), "q9");
  ASSERT_EQ(r.outputs_size(), 1);
  EXPECT_EQ(r.outputs(0).name(), "predictions");
  EXPECT_EQ(r.outputs(0).datatype(), "FP32");
  EXPECT_EQ(std::vector<std::int64_t>(r.outputs(0).shape().begin(), r.outputs(0).shape().end()),
            (std::vector<std::int64_t>{2, 2}));
  ASSERT_EQ(r.raw_output_contents_size(), 1);
  EXPECT_EQ(r.raw_output_contents(0), f32({1.0f, 2.0f, 3.0f, -4.5f}));
  EXPECT_EQ(r.parameters().at("carrara_variants").string_param(), "treatment,control");
  EXPECT_TRUE(r.parameters().at("carrara_degraded").bool_param());
}

TEST(Payload, ParsesSingleAndSeveralSlices) {
  auto r = request_with_ids({"u1", "u2"});
  r.set_id(std::string(3000, 'x'));
  const std::string wire = r.SerializeAsString();
  // Split across three slices, as gRPC may deliver a large message.
  grpc::Slice parts[] = {grpc::Slice(wire.substr(0, 10)), grpc::Slice(wire.substr(10, 2000)),
                         grpc::Slice(wire.substr(2010))};
  grpc::ByteBuffer several(parts, 3);
  inference::ModelInferRequest back;
  ASSERT_TRUE(detail::parse(several, back));
  EXPECT_EQ(back.id(), r.id());
  EXPECT_EQ(back.raw_input_contents(0), r.raw_input_contents(0));

  grpc::ByteBuffer out;
  detail::serialize(r, out);
  inference::ModelInferRequest again;
  ASSERT_TRUE(detail::parse(out, again));
  EXPECT_EQ(again.SerializeAsString(), wire);

  grpc::Slice garbage(std::string("\xff\xff\xff\xff\x0f", 5));
  grpc::ByteBuffer bad(&garbage, 1);
  EXPECT_FALSE(detail::parse(bad, back));
}

}  // namespace
}  // namespace carrara::server
