// The native gRPC front with auth on: bearer tokens (missing / wrong / malformed / right, on
// every service but grpc.health.v1, checked before the request is decoded) and TLS (a secure
// channel trusting the server's self-signed certificate works, plaintext and untrusted roots
// fail; with a client CA, only clients holding a certificate it signed get in). Certificates are
// made per test run with the openssl command-line tool; without it the TLS tests are skipped.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <sstream>

#include <unistd.h>

#include "carrara/server/grpc_server.hpp"
#include "carrara/v1/predict.grpc.pb.h"
#include "grpc_service.grpc.pb.h"
#include "linear_fixture.hpp"

namespace carrara::server {
namespace {

using testing::expected;
namespace fs = std::filesystem;
namespace kserve = inference;

constexpr const char* kToken = "tok-3f9a1c0d";
constexpr const char* kOtherToken = "second-token-77";

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

void deadline(grpc::ClientContext& ctx, int seconds = 10) {
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(seconds));
}

carrara::v1::PredictRequest scorer_request(const std::string& entity) {
  carrara::v1::PredictRequest q;
  q.set_model("scorer");
  q.add_entity_ids(entity);
  return q;
}

kserve::ModelInferRequest infer_request(const std::string& entity) {
  kserve::ModelInferRequest r;
  r.set_model_name("scorer");
  auto* t = r.add_inputs();
  t->set_name("entity_ids");
  t->set_datatype("BYTES");
  t->add_shape(1);
  std::string raw(4, '\0');
  raw[0] = static_cast<char>(entity.size());
  r.add_raw_input_contents(raw + entity);
  return r;
}

// Predict for u3 with `authorization` set to `auth` (none when empty).
grpc::Status predict(const std::shared_ptr<grpc::Channel>& channel, const std::string& auth,
                     carrara::v1::PredictResponse* out = nullptr) {
  auto stub = carrara::v1::Predict::NewStub(channel);
  grpc::ClientContext ctx;
  deadline(ctx);
  if (!auth.empty()) ctx.AddMetadata("authorization", auth);
  carrara::v1::PredictResponse r;
  grpc::Status s = stub->Predict(&ctx, scorer_request("u3"), &r);
  if (out) *out = r;
  return s;
}

grpc::Status raw_unary(const std::shared_ptr<grpc::Channel>& channel, const std::string& method,
                       const std::string& payload, const std::string& auth = "",
                       std::string* response = nullptr) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  deadline(ctx);
  if (!auth.empty()) ctx.AddMetadata("authorization", auth);
  grpc::Slice slice(payload);
  grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer reply;
  std::promise<grpc::Status> done;
  stub.UnaryCall(&ctx, method, grpc::StubOptions(), &request, &reply,
                 [&](grpc::Status s) { done.set_value(std::move(s)); });
  grpc::Status status = done.get_future().get();
  if (response) {
    std::vector<grpc::Slice> slices;
    response->clear();
    if (reply.Valid() && reply.Dump(&slices).ok()) {
      for (const grpc::Slice& s : slices) {
        response->append(reinterpret_cast<const char*>(s.begin()), s.size());
      }
    }
  }
  return status;
}

void expect_unauthenticated(const grpc::Status& s, const std::string& why) {
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << why << ": " << s.error_message();
  // The answer never echoes a token, sent or configured.
  EXPECT_FALSE(contains(s.error_message(), kToken)) << s.error_message();
  EXPECT_FALSE(contains(s.error_message(), kOtherToken)) << s.error_message();
  EXPECT_FALSE(contains(s.error_message(), "wrong-")) << s.error_message();
}

class GrpcAuthTest : public ::testing::Test {
 protected:
  void SetUp() override {
    setup_ = testing::make_setup();
    ServerOptions options;
    options.auth_tokens = {kToken, kOtherToken};
    server_ = std::make_unique<GrpcServer>(setup_.engine, options);
    channel_ = grpc::CreateChannel("127.0.0.1:" + std::to_string(server_->port()),
                                   grpc::InsecureChannelCredentials());
  }
  void TearDown() override {
    setup_.held->release();
    server_.reset();
    setup_.engine->close();
  }

  testing::Setup setup_;
  std::unique_ptr<GrpcServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
};

TEST_F(GrpcAuthTest, PredictNeedsAnAcceptedBearerToken) {
  const std::uint64_t reads = setup_.store->calls.load();
  grpc::Status s = predict(channel_, "");
  expect_unauthenticated(s, "no token");
  EXPECT_TRUE(contains(s.error_message(), "authorization: Bearer")) << s.error_message();
  s = predict(channel_, "Bearer wrong-token");
  expect_unauthenticated(s, "wrong token");
  EXPECT_TRUE(contains(s.error_message(), "not accepted")) << s.error_message();
  // A prefix or an extension of a real token is not it.
  expect_unauthenticated(predict(channel_, std::string("Bearer ") + kToken + "x"), "longer");
  expect_unauthenticated(predict(channel_, std::string("Bearer ") + "tok-3f9a1c0"), "prefix");
  expect_unauthenticated(predict(channel_, "Bearer "), "empty token");
  // Not the bearer scheme, or the bare token.
  s = predict(channel_, std::string("Basic ") + kToken);
  expect_unauthenticated(s, "basic");
  EXPECT_TRUE(contains(s.error_message(), "must be 'Bearer <token>'")) << s.error_message();
  expect_unauthenticated(predict(channel_, kToken), "bare token");
  // Refused before any work: the store was never read.
  EXPECT_EQ(setup_.store->calls.load(), reads);

  for (const std::string& auth : {std::string("Bearer ") + kToken,
                                  std::string("Bearer ") + kOtherToken,
                                  std::string("bearer  ") + kToken}) {  // scheme is case-blind
    carrara::v1::PredictResponse r;
    s = predict(channel_, auth, &r);
    ASSERT_TRUE(s.ok()) << auth << ": " << s.error_message();
    ASSERT_EQ(r.predictions_size(), 1);
    EXPECT_FLOAT_EQ(r.predictions(0).values(0), expected(3)[0]);
    EXPECT_FLOAT_EQ(r.predictions(0).values(1), expected(3)[1]);
  }
}

TEST_F(GrpcAuthTest, EveryKServeMethodNeedsTheTokenBeforeDecoding) {
  auto stub = kserve::GRPCInferenceService::NewStub(channel_);
  const std::string bearer = std::string("Bearer ") + kToken;
  {
    grpc::ClientContext ctx;
    deadline(ctx);
    kserve::ModelInferResponse r;
    expect_unauthenticated(stub->ModelInfer(&ctx, infer_request("u3"), &r), "ModelInfer");
  }
  {
    grpc::ClientContext ctx;
    deadline(ctx);
    ctx.AddMetadata("authorization", bearer);
    kserve::ModelInferResponse r;
    grpc::Status s = stub->ModelInfer(&ctx, infer_request("u3"), &r);
    ASSERT_TRUE(s.ok()) << s.error_message();
    ASSERT_EQ(r.raw_output_contents_size(), 1);
  }
  // Undecodable bytes without a token: UNAUTHENTICATED, not INVALID_ARGUMENT (never parsed).
  const std::string garbage("\xff\xff\xff", 3);
  expect_unauthenticated(
      raw_unary(channel_, "/inference.GRPCInferenceService/ModelInfer", garbage), "garbage");
  expect_unauthenticated(raw_unary(channel_, "/carrara.v1.Predict/Predict", garbage), "garbage");
  EXPECT_EQ(raw_unary(channel_, "/carrara.v1.Predict/Predict", garbage, bearer).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  // The small methods and the unsupported ones too.
  for (const char* method : {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                             "ModelMetadata", "ModelConfig", "ModelStatistics", "RepositoryIndex",
                             "RepositoryModelLoad", "TraceSetting"}) {
    const std::string path = std::string("/inference.GRPCInferenceService/") + method;
    expect_unauthenticated(raw_unary(channel_, path, ""), method);
    expect_unauthenticated(raw_unary(channel_, path, "", "Bearer nope"), method);
  }
  std::string live;
  ASSERT_TRUE(raw_unary(channel_, "/inference.GRPCInferenceService/ServerLive", "", bearer, &live)
                  .ok());
  EXPECT_EQ(live, std::string("\x08\x01", 2));  // live: true
  EXPECT_EQ(raw_unary(channel_, "/inference.GRPCInferenceService/RepositoryModelLoad", "", bearer)
                .error_code(),
            grpc::StatusCode::UNIMPLEMENTED);
}

TEST_F(GrpcAuthTest, StreamNeedsTheToken) {
  auto stub = kserve::GRPCInferenceService::NewStub(channel_);
  {
    grpc::ClientContext ctx;
    deadline(ctx);
    auto stream = stub->ModelStreamInfer(&ctx);
    stream->Write(infer_request("u3"));  // may fail: the server finished already
    stream->WritesDone();
    kserve::ModelStreamInferResponse r;
    EXPECT_FALSE(stream->Read(&r));
    expect_unauthenticated(stream->Finish(), "stream without a token");
  }
  grpc::ClientContext ctx;
  deadline(ctx);
  ctx.AddMetadata("authorization", std::string("Bearer ") + kOtherToken);
  auto stream = stub->ModelStreamInfer(&ctx);
  ASSERT_TRUE(stream->Write(infer_request("u4")));
  stream->WritesDone();
  kserve::ModelStreamInferResponse r;
  ASSERT_TRUE(stream->Read(&r));
  EXPECT_EQ(r.error_message(), "");
  EXPECT_FALSE(stream->Read(&r));
  EXPECT_TRUE(stream->Finish().ok());
}

TEST_F(GrpcAuthTest, HealthStaysOpen) {
  std::string reply;
  ASSERT_TRUE(raw_unary(channel_, "/grpc.health.v1.Health/Check", "", "", &reply).ok());
  EXPECT_EQ(reply, std::string("\x08\x01", 2));  // SERVING, without a token
}

TEST(GrpcAuthOptions, BadAuthAndTlsOptions) {
  testing::Setup setup = testing::make_setup();
  auto expect_code = [&](ServerOptions o, core::ErrorCode code, const std::string& what) {
    try {
      GrpcServer s(setup.engine, std::move(o));
      ADD_FAILURE() << "accepted " << what;
    } catch (const core::Error& e) {
      EXPECT_EQ(e.code(), code) << what << ": " << e.what();
    }
  };
  ServerOptions empty_token;
  empty_token.auth_tokens = {"ok", ""};
  expect_code(empty_token, core::ErrorCode::kInvalidArgument, "an empty token");
  ServerOptions cert_only;
  cert_only.tls_cert_chain = "-----BEGIN CERTIFICATE-----";
  expect_code(cert_only, core::ErrorCode::kInvalidArgument, "a certificate without a key");
  ServerOptions ca_only;
  ca_only.tls_client_ca = "-----BEGIN CERTIFICATE-----";
  expect_code(ca_only, core::ErrorCode::kInvalidArgument, "a client CA without TLS");
  setup.engine->close();
}

// --- TLS ----------------------------------------------------------------------------------

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

// Certificates in a fresh directory: a CA, a server certificate for localhost / 127.0.0.1
// signed by it, a client certificate signed by it, and an unrelated self-signed certificate.
class Certs {
 public:
  Certs() {
    dir_ = fs::temp_directory_path() /
           ("carrara-tls-" + std::to_string(::getpid()) + "-" +
            std::to_string(std::chrono::steady_clock::now().time_since_epoch().count()));
    fs::create_directories(dir_);
    const std::string d = dir_.string();
    const std::string ec = " -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2";
    ok_ = std::system("openssl version >/dev/null 2>&1") == 0 &&
          run("req -x509" + ec + " -subj /CN=carrara-test-ca -keyout " + d + "/ca.key -out " + d +
              "/ca.pem") &&
          run("req" + ec + " -subj /CN=localhost -keyout " + d + "/server.key -out " + d +
              "/server.csr") &&
          write_ext() &&
          run("x509 -req -in " + d + "/server.csr -CA " + d + "/ca.pem -CAkey " + d +
              "/ca.key -CAcreateserial -days 2 -extfile " + d + "/server.ext -out " + d +
              "/server.pem") &&
          run("req" + ec + " -subj /CN=client -keyout " + d + "/client.key -out " + d +
              "/client.csr") &&
          run("x509 -req -in " + d + "/client.csr -CA " + d + "/ca.pem -CAkey " + d +
              "/ca.key -CAcreateserial -days 2 -out " + d + "/client.pem") &&
          run("req -x509" + ec + " -subj /CN=localhost -addext subjectAltName=DNS:localhost" +
              " -keyout " + d + "/other.key -out " + d + "/other.pem");
  }
  ~Certs() {
    std::error_code ignored;
    fs::remove_all(dir_, ignored);
  }
  bool ok() const { return ok_; }
  std::string pem(const std::string& name) const { return read_file(dir_ / name); }

 private:
  bool run(const std::string& args) const {
    return std::system(("openssl " + args + " >/dev/null 2>&1").c_str()) == 0;
  }
  bool write_ext() const {
    std::ofstream(dir_ / "server.ext") << "subjectAltName=DNS:localhost,IP:127.0.0.1\n";
    return true;
  }
  fs::path dir_;
  bool ok_ = false;
};

std::shared_ptr<grpc::Channel> tls_channel(int port, const std::string& root,
                                           const std::string& key = "",
                                           const std::string& cert = "") {
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = root;
  ssl.pem_private_key = key;
  ssl.pem_cert_chain = cert;
  // An IP target (no DNS lookup: c-ares leaks a little under LeakSanitizer) checked against the
  // certificate's name `localhost`.
  grpc::ChannelArguments args;
  args.SetSslTargetNameOverride("localhost");
  return grpc::CreateCustomChannel("127.0.0.1:" + std::to_string(port), grpc::SslCredentials(ssl),
                                   args);
}

TEST(GrpcTls, SecureChannelWorksPlaintextAndUntrustedRootsFail) {
  Certs certs;
  if (!certs.ok()) GTEST_SKIP() << "the openssl command is not available";
  testing::Setup setup = testing::make_setup();
  ServerOptions options;
  options.tls_cert_chain = certs.pem("server.pem");
  options.tls_private_key = certs.pem("server.key");
  options.auth_tokens = {kToken};  // both: the token travels encrypted
  auto server = std::make_unique<GrpcServer>(setup.engine, options);
  const int port = server->port();

  carrara::v1::PredictResponse r;
  const std::string bearer = std::string("Bearer ") + kToken;
  grpc::Status s = predict(tls_channel(port, certs.pem("ca.pem")), bearer, &r);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_FLOAT_EQ(r.predictions(0).values(0), expected(3)[0]);
  expect_unauthenticated(predict(tls_channel(port, certs.pem("ca.pem")), ""), "TLS, no token");

  // Plaintext to a TLS port: no handshake, no answer.
  auto plain = grpc::CreateChannel("127.0.0.1:" + std::to_string(port),
                                   grpc::InsecureChannelCredentials());
  s = predict(plain, bearer);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  // A client that does not trust the server's CA refuses it.
  s = predict(tls_channel(port, certs.pem("other.pem")), bearer);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();

  server.reset();
  // Key and certificate that are not a pair (or not PEM): the server does not start.
  ServerOptions mismatched;
  mismatched.tls_cert_chain = certs.pem("server.pem");
  mismatched.tls_private_key = "not a key";
  try {
    GrpcServer bad(setup.engine, mismatched);
    ADD_FAILURE() << "started with an unusable key";
  } catch (const core::Error& e) {
    EXPECT_EQ(e.code(), core::ErrorCode::kUnavailable) << e.what();
    EXPECT_TRUE(contains(e.what(), "TLS")) << e.what();
  }
  setup.engine->close();
}

TEST(GrpcTls, ClientCertificatesWhenAClientCaIsSet) {
  Certs certs;
  if (!certs.ok()) GTEST_SKIP() << "the openssl command is not available";
  testing::Setup setup = testing::make_setup();
  ServerOptions options;
  options.tls_cert_chain = certs.pem("server.pem");
  options.tls_private_key = certs.pem("server.key");
  options.tls_client_ca = certs.pem("ca.pem");
  auto server = std::make_unique<GrpcServer>(setup.engine, options);
  const int port = server->port();
  const std::string ca = certs.pem("ca.pem");

  grpc::Status s =
      predict(tls_channel(port, ca, certs.pem("client.key"), certs.pem("client.pem")), "");
  ASSERT_TRUE(s.ok()) << s.error_message();
  s = predict(tls_channel(port, ca), "");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << "no client certificate";
  s = predict(tls_channel(port, ca, certs.pem("other.key"), certs.pem("other.pem")), "");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << "a certificate the CA did not sign";
  server.reset();
  setup.engine->close();
}

}  // namespace
}  // namespace carrara::server
