// Wire <-> engine conversions of the native gRPC front, apart from the transport so that they
// can be tested on their own. Errors are thrown as core::Error with the texts the Python front
// used (gateway/grpc_front.py); the server maps them with grpc_status().
#pragma once

#include <grpcpp/support/byte_buffer.h>

#include <string>
#include <string_view>
#include <vector>

#include "carrara/core/engine.hpp"
#include "carrara/v1/predict.pb.h"
#include "grpc_service.pb.h"

namespace carrara::server::detail {

inline constexpr std::string_view kEntityInput = "entity_ids";
inline constexpr std::string_view kOutputName = "predictions";
inline constexpr std::string_view kPlatform = "carrara";

// Strict UTF-8, as Python's bytes.decode(): no overlong forms, surrogates or code points past
// U+10FFFF.
bool valid_utf8(std::string_view s) noexcept;

// A KServe v2 raw BYTES tensor: each element is a 4-byte little-endian length + the bytes.
// Appends the elements to `out`; kInvalidArgument when truncated or not UTF-8.
void decode_bytes_tensor(std::string_view raw, std::vector<std::string>& out);

// "[2, 3]", as Python prints a list of ints.
std::string shape_text(const google::protobuf::RepeatedField<std::int64_t>& shape);

// ModelInferRequest -> engine call (model, version, entity ids, FP32 overrides). Checks the
// tensors only: model and version are the engine's to check.
core::PredictCall decode_infer_request(const inference::ModelInferRequest& request);

// Engine outcome -> ModelInferResponse: one FP32 [n, k] output `predictions` in
// raw_output_contents, variants and degraded as parameters.
void encode_infer_response(const core::PredictOutcome& outcome, const std::string& model_name,
                           const std::string& id, inference::ModelInferResponse& out);

core::PredictCall decode_predict_request(const carrara::v1::PredictRequest& request);
// Takes the entity ids out of `request` (they are echoed per prediction).
void encode_predict_response(const core::PredictOutcome& outcome,
                             carrara::v1::PredictRequest& request,
                             carrara::v1::PredictResponse& out);

// Parses a request payload; false when it is not a valid `message`.
bool parse(const grpc::ByteBuffer& buffer, google::protobuf::MessageLite& message);
// Serializes into one slice (no intermediate copy).
void serialize(const google::protobuf::MessageLite& message, grpc::ByteBuffer& out);

}  // namespace carrara::server::detail
