// The native gRPC front end to end: a GrpcServer on a free port over a real Engine (in-memory
// store, C++ linear models behind DynamicBatchers), called through the generated grpc++ stubs
// (and a generic stub for bytes that are not a valid message).
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <future>
#include <thread>

#include "carrara/server/grpc_server.hpp"
#include "carrara/v1/predict.grpc.pb.h"
#include "grpc_service.grpc.pb.h"
#include "linear_fixture.hpp"

namespace carrara::server {
namespace {

using testing::expected;
namespace kserve = inference;

std::string bytes_tensor(const std::vector<std::string>& items) {
  std::string out;
  for (const std::string& s : items) {
    const auto n = static_cast<std::uint32_t>(s.size());
    for (int b = 0; b < 4; ++b) out.push_back(static_cast<char>((n >> (8 * b)) & 0xFF));
    out.append(s);
  }
  return out;
}

std::string f32(const std::vector<float>& values) {
  std::string out(values.size() * 4, '\0');
  std::memcpy(out.data(), values.data(), out.size());
  return out;
}

std::vector<float> floats(const std::string& raw) {
  std::vector<float> out(raw.size() / 4);
  std::memcpy(out.data(), raw.data(), out.size() * 4);
  return out;
}

kserve::ModelInferRequest infer_request(const std::string& model,
                                        const std::vector<std::string>& ids,
                                        const std::string& id = "") {
  kserve::ModelInferRequest r;
  r.set_model_name(model);
  r.set_id(id);
  auto* t = r.add_inputs();
  t->set_name("entity_ids");
  t->set_datatype("BYTES");
  t->add_shape(static_cast<std::int64_t>(ids.size()));
  r.add_raw_input_contents(bytes_tensor(ids));
  r.add_outputs()->set_name("predictions");
  return r;
}

void expect_rows(const std::string& raw, const std::vector<std::vector<float>>& rows) {
  const std::vector<float> got = floats(raw);
  ASSERT_EQ(got.size(), rows.size() * 2);
  for (std::size_t i = 0; i < rows.size(); ++i) {
    EXPECT_FLOAT_EQ(got[2 * i], rows[i][0]) << "row " << i;
    EXPECT_FLOAT_EQ(got[2 * i + 1], rows[i][1]) << "row " << i;
  }
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

std::string dump(const grpc::ByteBuffer& b) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!b.Valid() || !b.Dump(&slices).ok()) return out;
  for (const grpc::Slice& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

// One unary call with a raw payload, through the generic stub.
grpc::Status raw_unary(const std::shared_ptr<grpc::Channel>& channel, const std::string& method,
                       const std::string& payload, std::string* response = nullptr) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  grpc::Slice slice(payload);
  grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer reply;
  std::promise<grpc::Status> done;
  stub.UnaryCall(&ctx, method, grpc::StubOptions(), &request, &reply,
                 [&](grpc::Status s) { done.set_value(std::move(s)); });
  grpc::Status status = done.get_future().get();
  if (response) *response = dump(reply);
  return status;
}

// grpc.health.v1.Health/Check for service "" (request: empty message); returns the status
// enum (1 SERVING, 2 NOT_SERVING) or -1 on an RPC error.
int health(const std::shared_ptr<grpc::Channel>& channel, const std::string& service = "") {
  std::string request;
  if (!service.empty()) {
    request.push_back('\x0a');
    request.push_back(static_cast<char>(service.size()));
    request += service;
  }
  std::string reply;
  if (!raw_unary(channel, "/grpc.health.v1.Health/Check", request, &reply).ok()) return -1;
  if (reply.empty()) return 0;  // UNKNOWN (the default value is not on the wire)
  EXPECT_EQ(reply.size(), 2u);
  EXPECT_EQ(reply[0], '\x08');
  return reply[1];
}

class GrpcServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    setup_ = testing::make_setup();
    ServerOptions options;
    options.server_version = "9.9.9";
    server_ = std::make_unique<GrpcServer>(setup_.engine, options);
    ASSERT_GT(server_->port(), 0);
    channel_ = grpc::CreateChannel("127.0.0.1:" + std::to_string(server_->port()),
                                   grpc::InsecureChannelCredentials());
    kserve_ = kserve::GRPCInferenceService::NewStub(channel_);
    predict_ = carrara::v1::Predict::NewStub(channel_);
  }

  void TearDown() override {
    setup_.held->release();
    server_.reset();
    setup_.engine->close();
  }

  static void deadline(grpc::ClientContext& ctx, int seconds = 10) {
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(seconds));
  }

  grpc::Status infer(const kserve::ModelInferRequest& request, kserve::ModelInferResponse& out) {
    grpc::ClientContext ctx;
    deadline(ctx);
    return kserve_->ModelInfer(&ctx, request, &out);
  }

  grpc::Status predict(const carrara::v1::PredictRequest& request,
                       carrara::v1::PredictResponse& out) {
    grpc::ClientContext ctx;
    deadline(ctx);
    return predict_->Predict(&ctx, request, &out);
  }

  testing::Setup setup_;
  std::unique_ptr<GrpcServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<kserve::GRPCInferenceService::Stub> kserve_;
  std::unique_ptr<carrara::v1::Predict::Stub> predict_;
};

TEST_F(GrpcServerTest, CarraraPredict) {
  carrara::v1::PredictRequest q;
  q.set_model("scorer");
  q.add_entity_ids("u3");
  q.add_entity_ids("u7");
  q.add_entity_ids("nobody");
  q.set_request_id("q1");
  carrara::v1::PredictResponse r;
  ASSERT_TRUE(predict(q, r).ok());
  EXPECT_EQ(r.model(), "scorer");
  EXPECT_EQ(r.model_version(), 3u);
  EXPECT_EQ(r.variant(), "v3");
  EXPECT_EQ(r.request_id(), "q1");
  EXPECT_TRUE(r.degraded());  // "nobody" has no row: defaults stand in, flagged degraded
  ASSERT_EQ(r.predictions_size(), 3);
  const int ids[] = {3, 7, -1};
  const char* names[] = {"u3", "u7", "nobody"};
  for (int i = 0; i < 3; ++i) {
    const auto& p = r.predictions(i);
    EXPECT_EQ(p.entity_id(), names[i]);
    EXPECT_EQ(p.variant(), "v3");
    EXPECT_EQ(p.model_version(), 3u);
    EXPECT_EQ(p.degraded(), ids[i] < 0);
    ASSERT_EQ(p.values_size(), 2);
    EXPECT_FLOAT_EQ(p.values(0), expected(ids[i])[0]);
    EXPECT_FLOAT_EQ(p.values(1), expected(ids[i])[1]);
  }

  // Override b = 10 for the one entity: [3 + 0.5, 20 - 0.5].
  carrara::v1::PredictRequest o;
  o.set_model("scorer");
  o.add_entity_ids("u3");
  auto* ov = o.add_overrides();
  ov->set_name("b");
  ov->add_values(10.0f);
  ASSERT_TRUE(predict(o, r).ok());
  EXPECT_FLOAT_EQ(r.predictions(0).values(0), 3.5f);
  EXPECT_FLOAT_EQ(r.predictions(0).values(1), 19.5f);
  EXPECT_FALSE(r.request_id().empty());  // the engine made one

  ov->set_values(0, std::nanf(""));
  grpc::Status s = predict(o, r);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(contains(s.error_message(), "non-finite")) << s.error_message();

  ov->set_name("zz");
  ov->set_values(0, 1.0f);
  s = predict(o, r);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();

  carrara::v1::PredictRequest nope;
  nope.set_model("nope");
  nope.add_entity_ids("u1");
  s = predict(nope, r);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(contains(s.error_message(), "not deployed")) << s.error_message();

  carrara::v1::PredictRequest empty;
  empty.set_model("scorer");
  s = predict(empty, r);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_F(GrpcServerTest, PredictReportsVariantsPerEntity) {
  carrara::v1::PredictRequest q;
  q.set_model("ab");
  for (int i = 0; i < 40; ++i) q.add_entity_ids("u" + std::to_string(i));
  carrara::v1::PredictResponse r;
  ASSERT_TRUE(predict(q, r).ok());
  ASSERT_EQ(r.predictions_size(), 40);
  int treatment = 0;
  for (int i = 0; i < 40; ++i) {
    const auto& p = r.predictions(i);
    const bool t = p.variant() == "treatment";
    treatment += t;
    EXPECT_EQ(p.model_version(), t ? 2u : 1u);
    EXPECT_FLOAT_EQ(p.values(0), expected(i, t ? 100.0f : 0.0f)[0]) << p.variant();
    EXPECT_FLOAT_EQ(p.values(1), expected(i, t ? 100.0f : 0.0f)[1]);
  }
  EXPECT_GT(treatment, 0);
  EXPECT_LT(treatment, 40);
  EXPECT_EQ(r.variant(), r.predictions(0).variant());
  EXPECT_EQ(r.model_version(), r.predictions(0).model_version());
}

TEST_F(GrpcServerTest, ServerAndModelState) {
  grpc::ClientContext c1;
  kserve::ServerLiveResponse live;
  ASSERT_TRUE(kserve_->ServerLive(&c1, {}, &live).ok());
  EXPECT_TRUE(live.live());
  grpc::ClientContext c2;
  kserve::ServerReadyResponse ready;
  ASSERT_TRUE(kserve_->ServerReady(&c2, {}, &ready).ok());
  EXPECT_TRUE(ready.ready());

  auto model_ready = [&](const std::string& name, const std::string& version = "") {
    grpc::ClientContext ctx;
    kserve::ModelReadyRequest q;
    q.set_name(name);
    q.set_version(version);
    kserve::ModelReadyResponse r;
    EXPECT_TRUE(kserve_->ModelReady(&ctx, q, &r).ok());
    return r.ready();
  };
  EXPECT_TRUE(model_ready("scorer"));
  EXPECT_TRUE(model_ready("scorer", "3"));
  EXPECT_FALSE(model_ready("scorer", "7"));
  EXPECT_FALSE(model_ready("nope"));

  grpc::ClientContext c3;
  kserve::ServerMetadataResponse meta;
  ASSERT_TRUE(kserve_->ServerMetadata(&c3, {}, &meta).ok());
  EXPECT_EQ(meta.name(), "carrara");
  EXPECT_EQ(meta.version(), "9.9.9");
  EXPECT_EQ(meta.extensions_size(), 0);
}

TEST_F(GrpcServerTest, ModelMetadataAndConfig) {
  grpc::ClientContext c1;
  kserve::ModelMetadataRequest q;
  q.set_name("scorer");
  kserve::ModelMetadataResponse m;
  ASSERT_TRUE(kserve_->ModelMetadata(&c1, q, &m).ok());
  EXPECT_EQ(m.name(), "scorer");
  EXPECT_EQ(std::vector<std::string>(m.versions().begin(), m.versions().end()),
            std::vector<std::string>{"3"});
  EXPECT_EQ(m.platform(), "carrara");
  ASSERT_EQ(m.inputs_size(), 1);
  EXPECT_EQ(m.inputs(0).name(), "entity_ids");
  EXPECT_EQ(m.inputs(0).datatype(), "BYTES");
  EXPECT_EQ(std::vector<std::int64_t>(m.inputs(0).shape().begin(), m.inputs(0).shape().end()),
            std::vector<std::int64_t>{-1});
  ASSERT_EQ(m.outputs_size(), 1);
  EXPECT_EQ(m.outputs(0).name(), "predictions");
  EXPECT_EQ(m.outputs(0).datatype(), "FP32");
  EXPECT_EQ(std::vector<std::int64_t>(m.outputs(0).shape().begin(), m.outputs(0).shape().end()),
            (std::vector<std::int64_t>{-1, 2}));

  grpc::ClientContext c1b;
  q.set_name("ab");
  ASSERT_TRUE(kserve_->ModelMetadata(&c1b, q, &m).ok());
  EXPECT_EQ(std::vector<std::string>(m.versions().begin(), m.versions().end()),
            (std::vector<std::string>{"1", "2"}));

  grpc::ClientContext c2;
  q.set_name("nope");
  grpc::Status s = kserve_->ModelMetadata(&c2, q, &m);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(s.error_message(), "model 'nope' is not deployed");

  grpc::ClientContext c3;
  kserve::ModelConfigRequest cq;
  cq.set_name("scorer");
  kserve::ModelConfigResponse cr;
  ASSERT_TRUE(kserve_->ModelConfig(&c3, cq, &cr).ok());
  const auto& config = cr.config();
  EXPECT_EQ(config.name(), "scorer");
  EXPECT_EQ(config.platform(), "carrara");
  EXPECT_EQ(config.backend(), "carrara");
  EXPECT_EQ(config.max_batch_size(), 0);
  ASSERT_EQ(config.input_size(), 1);
  EXPECT_EQ(config.input(0).name(), "entity_ids");
  EXPECT_EQ(config.input(0).data_type(), kserve::TYPE_STRING);
  EXPECT_EQ(std::vector<std::int64_t>(config.input(0).dims().begin(), config.input(0).dims().end()),
            std::vector<std::int64_t>{-1});
  ASSERT_EQ(config.output_size(), 1);
  EXPECT_EQ(config.output(0).name(), "predictions");
  EXPECT_EQ(config.output(0).data_type(), kserve::TYPE_FP32);
  EXPECT_EQ(
      std::vector<std::int64_t>(config.output(0).dims().begin(), config.output(0).dims().end()),
      (std::vector<std::int64_t>{-1, 2}));

  grpc::ClientContext c4;
  cq.set_name("nope");
  s = kserve_->ModelConfig(&c4, cq, &cr);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(s.error_message(), "model 'nope' is not deployed");
}

TEST_F(GrpcServerTest, ModelInferRaw) {
  kserve::ModelInferResponse r;
  ASSERT_TRUE(infer(infer_request("scorer", {"u1", "u42", "u99"}, "req-7"), r).ok());
  EXPECT_EQ(r.model_name(), "scorer");
  EXPECT_EQ(r.model_version(), "3");
  EXPECT_EQ(r.id(), "req-7");
  ASSERT_EQ(r.outputs_size(), 1);
  EXPECT_EQ(r.outputs(0).name(), "predictions");
  EXPECT_EQ(r.outputs(0).datatype(), "FP32");
  EXPECT_EQ(std::vector<std::int64_t>(r.outputs(0).shape().begin(), r.outputs(0).shape().end()),
            (std::vector<std::int64_t>{3, 2}));
  ASSERT_EQ(r.raw_output_contents_size(), 1);
  expect_rows(r.raw_output_contents(0), {expected(1), expected(42), expected(99)});
  EXPECT_EQ(r.parameters().at("carrara_variants").string_param(), "v3,v3,v3");
  EXPECT_FALSE(r.parameters().at("carrara_degraded").bool_param());

  // Per-entity FP32 override from raw bytes: a = [0, 0, 1].
  kserve::ModelInferRequest q = infer_request("scorer", {"u1", "u42", "u99"});
  auto* o = q.add_inputs();
  o->set_name("a");
  o->set_datatype("FP32");
  o->add_shape(3);
  q.add_raw_input_contents(f32({0.0f, 0.0f, 1.0f}));
  ASSERT_TRUE(infer(q, r).ok());
  expect_rows(r.raw_output_contents(0), {{0.5f, expected(1)[1]}, {0.5f, expected(42)[1]},
                                        {1.5f, -198.5f}});

  // The version, when given, must be deployed.
  q = infer_request("scorer", {"u1"});
  q.set_model_version("3");
  ASSERT_TRUE(infer(q, r).ok());
  q.set_model_version("7");
  grpc::Status s = infer(q, r);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(contains(s.error_message(), "model 'scorer' has no deployed version 7; deployed:"))
      << s.error_message();
}

TEST_F(GrpcServerTest, ModelInferContentsAndVariants) {
  kserve::ModelInferRequest q;
  q.set_model_name("ab");
  auto* t = q.add_inputs();
  t->set_name("entity_ids");
  t->set_datatype("BYTES");
  t->add_shape(20);
  for (int i = 0; i < 20; ++i) t->mutable_contents()->add_bytes_contents("u" + std::to_string(i));
  auto* b = q.add_inputs();
  b->set_name("b");
  b->set_datatype("FP32");
  b->add_shape(1);
  b->mutable_contents()->add_fp32_contents(1.0f);
  kserve::ModelInferResponse r;
  ASSERT_TRUE(infer(q, r).ok());
  const std::string variants = r.parameters().at("carrara_variants").string_param();
  std::vector<std::string> per_entity;
  for (std::size_t start = 0;;) {
    const std::size_t comma = variants.find(',', start);
    per_entity.push_back(variants.substr(start, comma - start));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  ASSERT_EQ(per_entity.size(), 20u);
  const std::vector<float> got = floats(r.raw_output_contents(0));
  for (int i = 0; i < 20; ++i) {
    const float shift = per_entity[i] == "treatment" ? 100.0f : 0.0f;
    EXPECT_FLOAT_EQ(got[2 * i], expected(i, shift)[0]) << per_entity[i];
    EXPECT_FLOAT_EQ(got[2 * i + 1], 2.0f - 0.5f + shift);  // b overridden to 1
  }
  EXPECT_EQ(r.model_version(), per_entity[0] == "treatment" ? "2" : "1");
}

TEST_F(GrpcServerTest, ModelInferErrors) {
  kserve::ModelInferResponse r;
  auto expect = [&](const kserve::ModelInferRequest& q, grpc::StatusCode code,
                    const std::string& text) {
    const grpc::Status s = infer(q, r);
    EXPECT_EQ(s.error_code(), code) << s.error_message();
    EXPECT_TRUE(contains(s.error_message(), text)) << "'" << text << "' not in: " << s.error_message();
  };
  const auto INVALID = grpc::StatusCode::INVALID_ARGUMENT;

  kserve::ModelInferRequest q = infer_request("scorer", {"u1", "u2"});
  q.mutable_inputs(0)->set_datatype("FP32");
  q.set_raw_input_contents(0, f32({1.0f, 2.0f}));
  expect(q, INVALID, "input 'entity_ids' must be BYTES, got FP32");

  q = infer_request("scorer", {"u1", "u2"});
  q.set_raw_input_contents(0, q.raw_input_contents(0).substr(0, 7));
  expect(q, INVALID, "truncated BYTES tensor");
  q.set_raw_input_contents(0, bytes_tensor({"u1"}) + "\x02");
  expect(q, INVALID, "truncated BYTES tensor");
  q.set_raw_input_contents(0, bytes_tensor({"u1", "\xc3\x28"}));
  expect(q, INVALID, "entity ids must be UTF-8");

  q = infer_request("scorer", {"u1", "u2"});
  q.mutable_inputs(0)->set_shape(0, 5);
  expect(q, INVALID, "input 'entity_ids' has shape [5] but 2 elements");

  q = infer_request("scorer", {"u1"});
  q.add_raw_input_contents("x");
  expect(q, INVALID, "raw_input_contents must have one entry per input");

  q = infer_request("scorer", {"u1"});
  auto* o = q.add_inputs();
  o->set_name("a");
  o->set_datatype("INT64");
  o->add_shape(1);
  q.add_raw_input_contents(std::string(8, '\0'));
  expect(q, INVALID, "override input 'a' must be FP32, got INT64");
  o->set_datatype("FP32");
  q.set_raw_input_contents(1, std::string(6, '\0'));
  expect(q, INVALID, "multiple of 4");
  q.set_raw_input_contents(1, f32({1.0f, 2.0f, 3.0f}));
  expect(q, INVALID, "override input 'a' has shape [1] but 3 elements");
  q.set_raw_input_contents(1, f32({INFINITY}));
  expect(q, INVALID, "non-finite");
  q.set_raw_input_contents(1, f32({1.0f}));
  o->set_name("zz");
  expect(q, INVALID, "zz");

  kserve::ModelInferRequest none;
  none.set_model_name("scorer");
  expect(none, INVALID, "ModelInfer needs a BYTES input named 'entity_ids'");

  q = infer_request("scorer", {"u1"});
  q.add_outputs()->set_name("scores");
  expect(q, INVALID, "unknown output 'scores'; this model has 'predictions'");

  expect(infer_request("nope", {"u1"}), grpc::StatusCode::NOT_FOUND, "model 'nope' is not deployed");
}

TEST_F(GrpcServerTest, UndecodableBytesAreInvalidArgument) {
  const std::string garbage("\xff\xff\xff\xff\xff\x01\x02", 7);
  for (const char* method :
       {"/inference.GRPCInferenceService/ModelInfer", "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ModelMetadata", "/carrara.v1.Predict/Predict"}) {
    const grpc::Status s = raw_unary(channel_, method, garbage);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << method;
    EXPECT_TRUE(contains(s.error_message(), "request is not a valid ")) << s.error_message();
  }
  EXPECT_EQ(raw_unary(channel_, "/inference.GRPCInferenceService/ModelInfer", garbage)
                .error_message(),
            "request is not a valid inference.ModelInferRequest");
  EXPECT_EQ(raw_unary(channel_, "/carrara.v1.Predict/Predict", garbage).error_message(),
            "request is not a valid carrara.v1.PredictRequest");
  // A string field holding invalid UTF-8 is not a valid proto3 message either.
  std::string wire = "\x0a\x02\xc3\x28";
  EXPECT_EQ(raw_unary(channel_, "/inference.GRPCInferenceService/ModelMetadata", wire).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  // Methods nobody serves, and KServe methods carrara does not implement.
  EXPECT_EQ(raw_unary(channel_, "/carrara.v1.Nope/Nope", "").error_code(),
            grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_EQ(raw_unary(channel_, "/inference.GRPCInferenceService/RepositoryModelLoad", garbage)
                .error_code(),
            grpc::StatusCode::UNIMPLEMENTED);
  // An empty payload is a valid (empty) message.
  std::string reply;
  ASSERT_TRUE(raw_unary(channel_, "/inference.GRPCInferenceService/ServerLive", "", &reply).ok());
  kserve::ServerLiveResponse live;
  ASSERT_TRUE(live.ParseFromString(reply));
  EXPECT_TRUE(live.live());
}

TEST_F(GrpcServerTest, StatisticsAndRepositoryIndex) {
  kserve::ModelInferResponse r;
  ASSERT_TRUE(infer(infer_request("scorer", {"u1"}), r).ok());
  ASSERT_TRUE(infer(infer_request("scorer", {"u2"}), r).ok());
  kserve::ModelInferRequest bad = infer_request("scorer", {"u1"});
  bad.mutable_inputs(0)->set_datatype("INT32");
  ASSERT_FALSE(infer(bad, r).ok());                                   // refused by the front
  kserve::ModelInferRequest nan = infer_request("scorer", {"u1"});
  auto* o = nan.add_inputs();
  o->set_name("a");
  o->set_datatype("FP32");
  o->add_shape(1);
  nan.add_raw_input_contents(f32({NAN}));
  ASSERT_FALSE(infer(nan, r).ok());                                   // refused by the engine
  ASSERT_FALSE(infer(infer_request("nope", {"u1"}), r).ok());

  grpc::ClientContext c1;
  kserve::ModelStatisticsRequest q;
  q.set_name("scorer");
  kserve::ModelStatisticsResponse s;
  ASSERT_TRUE(kserve_->ModelStatistics(&c1, q, &s).ok());
  ASSERT_EQ(s.model_stats_size(), 1);
  const auto& st = s.model_stats(0);
  EXPECT_EQ(st.name(), "scorer");
  EXPECT_EQ(st.inference_stats().success().count(), 2u);
  EXPECT_EQ(st.inference_stats().fail().count(), 2u);
  EXPECT_GT(st.inference_stats().success().ns(), 0u);
  EXPECT_GT(st.last_inference(), 0u);

  grpc::ClientContext c2;
  q.set_name("");
  ASSERT_TRUE(kserve_->ModelStatistics(&c2, q, &s).ok());
  std::vector<std::string> names;
  for (const auto& m : s.model_stats()) names.push_back(m.name());
  EXPECT_EQ(names, (std::vector<std::string>{"ab", "held", "scorer"}));

  grpc::ClientContext c3;
  q.set_name("nope");
  const grpc::Status missing = kserve_->ModelStatistics(&c3, q, &s);
  EXPECT_EQ(missing.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(missing.error_message(), "model 'nope' is not deployed");

  grpc::ClientContext c4;
  kserve::RepositoryIndexResponse index;
  ASSERT_TRUE(kserve_->RepositoryIndex(&c4, {}, &index).ok());
  std::vector<std::string> entries;
  for (const auto& m : index.models()) {
    EXPECT_EQ(m.state(), "READY");
    entries.push_back(m.name() + ":" + m.version());
  }
  EXPECT_EQ(entries, (std::vector<std::string>{"ab:1", "ab:2", "held:1", "scorer:3"}));
}

TEST_F(GrpcServerTest, Degraded) {
  setup_.store->failing = true;
  kserve::ModelInferResponse r;
  ASSERT_TRUE(infer(infer_request("scorer", {"u60", "u61"}), r).ok());
  EXPECT_TRUE(r.parameters().at("carrara_degraded").bool_param());
  expect_rows(r.raw_output_contents(0), {expected(-1), expected(-1)});  // defaults
  carrara::v1::PredictRequest q;
  q.set_model("scorer");
  q.add_entity_ids("u62");
  carrara::v1::PredictResponse pr;
  ASSERT_TRUE(predict(q, pr).ok());
  EXPECT_TRUE(pr.degraded());
  EXPECT_TRUE(pr.predictions(0).degraded());
  setup_.store->failing = false;
}

TEST_F(GrpcServerTest, StreamAnswersInOrderAndGoesOnAfterErrors) {
  grpc::ClientContext ctx;
  deadline(ctx, 30);
  auto stream = kserve_->ModelStreamInfer(&ctx);
  constexpr int kRequests = 300;  // past the server's window: reads pause and resume
  std::thread writer([&] {
    for (int i = 0; i < kRequests; ++i) {
      kserve::ModelInferRequest q = infer_request(i % 3 == 0 ? "ab" : "scorer",
                                                  {"u" + std::to_string(i % 100)},
                                                  "s" + std::to_string(i));
      if (i % 7 == 3) q.mutable_inputs(0)->set_datatype("FP32");  // answered with an error
      if (i % 11 == 5) q.set_model_name("nope");
      if (!stream->Write(q)) break;
    }
    stream->WritesDone();
  });
  kserve::ModelStreamInferResponse r;
  int i = 0;
  for (; stream->Read(&r); ++i) {
    ASSERT_LT(i, kRequests);
    if (i % 7 == 3) {
      EXPECT_TRUE(contains(r.error_message(), "must be BYTES, got FP32")) << i;
      EXPECT_EQ(r.infer_response().id(), "s" + std::to_string(i));
      continue;
    }
    if (i % 11 == 5) {
      EXPECT_TRUE(contains(r.error_message(), "not deployed")) << i;
      continue;
    }
    ASSERT_EQ(r.error_message(), "") << i;
    const auto& resp = r.infer_response();
    EXPECT_EQ(resp.id(), "s" + std::to_string(i));
    const std::string variant = resp.parameters().at("carrara_variants").string_param();
    const float shift = variant == "treatment" ? 100.0f : 0.0f;
    expect_rows(resp.raw_output_contents(0), {expected(i % 100, shift)});
  }
  writer.join();
  EXPECT_EQ(i, kRequests);
  EXPECT_TRUE(stream->Finish().ok());
}

TEST_F(GrpcServerTest, StreamAnswersGarbageAndDraining) {
  grpc::GenericStub stub(channel_);
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  deadline(ctx, 30);
  auto call = stub.PrepareCall(&ctx, "/inference.GRPCInferenceService/ModelStreamInfer", &cq);
  auto wait = [&](std::intptr_t tag) {
    void* got = nullptr;
    bool ok = false;
    EXPECT_TRUE(cq.Next(&got, &ok));
    EXPECT_EQ(reinterpret_cast<std::intptr_t>(got), tag);
    return ok;
  };
  call->StartCall(reinterpret_cast<void*>(1));
  ASSERT_TRUE(wait(1));
  auto send = [&](const std::string& bytes) {
    grpc::Slice slice(bytes);
    grpc::ByteBuffer b(&slice, 1);
    call->Write(b, reinterpret_cast<void*>(2));
    ASSERT_TRUE(wait(2));
  };
  auto receive = [&]() {
    grpc::ByteBuffer b;
    call->Read(&b, reinterpret_cast<void*>(3));
    EXPECT_TRUE(wait(3));
    kserve::ModelStreamInferResponse r;
    EXPECT_TRUE(r.ParseFromString(dump(b)));
    return r;
  };
  send(std::string("\xff\xff\xff", 3));
  EXPECT_EQ(receive().error_message(), "request is not a valid inference.ModelInferRequest");
  send(infer_request("scorer", {"u5"}, "ok-1").SerializeAsString());
  kserve::ModelStreamInferResponse r = receive();
  EXPECT_EQ(r.error_message(), "");
  expect_rows(r.infer_response().raw_output_contents(0), {expected(5)});

  // Shutdown begins with the stream open: what it sends from now on is refused, and the
  // stream still ends cleanly when the client closes it within the grace period.
  std::thread stopper([&] { server_->shutdown(10'000'000'000); });
  while (!server_->shutting_down()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  send(infer_request("scorer", {"u5"}, "late").SerializeAsString());
  r = receive();
  EXPECT_EQ(r.error_message(), "gateway is shutting down; retry on another replica");
  EXPECT_EQ(r.infer_response().id(), "late");
  call->WritesDone(reinterpret_cast<void*>(4));
  ASSERT_TRUE(wait(4));
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(5));
  ASSERT_TRUE(wait(5));
  EXPECT_TRUE(status.ok()) << status.error_message();
  stopper.join();
  cq.Shutdown();
  void* tag;
  bool ok;
  while (cq.Next(&tag, &ok)) {
  }
}

TEST_F(GrpcServerTest, Health) {
  EXPECT_EQ(health(channel_), 1);
  EXPECT_EQ(health(channel_, "carrara.v1.Predict"), 1);
  EXPECT_EQ(health(channel_, "inference.GRPCInferenceService"), 1);
  server_->set_serving(false);
  EXPECT_EQ(health(channel_), 2);
  server_->set_serving(true);
  EXPECT_EQ(health(channel_), 1);
}

TEST_F(GrpcServerTest, ManyConcurrentCalls) {
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 50; ++i) {
        const int e = (t * 50 + i) % 100;
        kserve::ModelInferResponse r;
        grpc::ClientContext ctx;
        deadline(ctx);
        const grpc::Status s =
            kserve_->ModelInfer(&ctx, infer_request("scorer", {"u" + std::to_string(e)}), &r);
        if (!s.ok() || floats(r.raw_output_contents(0)) != expected(e)) ++failures;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
}

TEST_F(GrpcServerTest, GracefulShutdownFinishesInFlightCalls) {
  // Two calls held in the executor; shutdown waits for them within its grace period.
  std::vector<std::future<std::pair<grpc::Status, carrara::v1::PredictResponse>>> calls;
  for (int i = 0; i < 2; ++i) {
    calls.push_back(std::async(std::launch::async, [this, i] {
      carrara::v1::PredictRequest q;
      q.set_model("held");
      q.add_entity_ids("u" + std::to_string(i + 1));
      carrara::v1::PredictResponse r;
      grpc::Status s = predict(q, r);
      return std::make_pair(s, r);
    }));
  }
  ASSERT_TRUE(setup_.held->wait_held(2, 5'000));
  auto stopping = std::async(std::launch::async, [this] { server_->shutdown(10'000'000'000); });
  EXPECT_EQ(stopping.wait_for(std::chrono::milliseconds(300)), std::future_status::timeout);
  EXPECT_TRUE(server_->shutting_down());
  setup_.held->release();
  for (int i = 0; i < 2; ++i) {
    auto [s, r] = calls[i].get();
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_FLOAT_EQ(r.predictions(0).values(0), expected(i + 1)[0]);
  }
  EXPECT_EQ(stopping.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  // Closed: new connections are refused.
  auto fresh = grpc::CreateChannel("127.0.0.1:" + std::to_string(server_->port()),
                                   grpc::InsecureChannelCredentials());
  EXPECT_EQ(health(fresh), -1);
}

TEST_F(GrpcServerTest, ShutdownPastGraceCancels) {
  auto call = std::async(std::launch::async, [this] {
    kserve::ModelInferResponse r;
    return infer(infer_request("held", {"u1"}), r);
  });
  ASSERT_TRUE(setup_.held->wait_held(1, 5'000));
  const auto start = std::chrono::steady_clock::now();
  auto stopping = std::async(std::launch::async, [this] { server_->shutdown(100'000'000); });
  // The client sees the cancellation at the end of the grace period...
  const grpc::Status s = call.get();
  EXPECT_FALSE(s.ok());
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  // ...and shutdown returns once the engine has let go of the call.
  setup_.held->release();
  EXPECT_EQ(stopping.wait_for(std::chrono::seconds(10)), std::future_status::ready);
}

TEST(GrpcServerStart, TakenPortAndBadOptions) {
  testing::Setup setup = testing::make_setup();
  GrpcServer first(setup.engine, ServerOptions{});
  ServerOptions same;
  same.port = first.port();
  try {
    GrpcServer second(setup.engine, same);
    ADD_FAILURE() << "bound a taken port";
  } catch (const core::Error& e) {
    EXPECT_EQ(e.code(), core::ErrorCode::kUnavailable) << e.what();
  }
  ServerOptions bad;
  bad.port = 70'000;
  try {
    GrpcServer third(setup.engine, bad);
    ADD_FAILURE() << "accepted port 70000";
  } catch (const core::Error& e) {
    EXPECT_EQ(e.code(), core::ErrorCode::kInvalidArgument) << e.what();
  }
  first.shutdown(0);
  first.shutdown(0);  // idempotent
  setup.engine->close();
}

}  // namespace
}  // namespace carrara::server
