// GrpcServer: the native gRPC front over core::Engine.
//
// One port serves Carrara's `carrara.v1.Predict`, the KServe v2 / Triton
// `inference.GRPCInferenceService` (so unmodified tritonclient and perf_analyzer work) and
// `grpc.health.v1.Health` (grpc++'s default health service). Requests are decoded on the gRPC
// callback thread and handed to Engine::predict directly; the reply is sent from whichever
// thread completes the prediction. No Python here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "carrara/core/engine.hpp"

namespace carrara::server {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 0;                              // 0 = pick a free port
  std::size_t max_message_bytes = 16u << 20;  // receive and send limit per message
  std::string server_name = "carrara";       // ServerMetadata.name
  std::string server_version;                // ServerMetadata.version

  // Off by default (the embedded / loopback case): no check, no TLS.
  //
  // Bearer tokens. When any is set, every call except grpc.health.v1 must carry the metadata
  // `authorization: Bearer <one of these>`, or is answered UNAUTHENTICATED before its request
  // is parsed. Compared in constant time; never logged or echoed.
  std::vector<std::string> auth_tokens;
  // TLS: the server's certificate chain and private key, PEM contents (not paths). Both or
  // neither; with them the port speaks TLS only.
  std::string tls_cert_chain;
  std::string tls_private_key;
  // PEM CA bundle (needs TLS): when set, clients must present a certificate it signed (mTLS).
  std::string tls_client_ca;
};

class GrpcServer {
 public:
  // Starts serving. Throws core::Error(kUnavailable) when the address cannot be bound (or the
  // TLS key and certificate are unusable) and core::Error(kInvalidArgument) on bad options.
  GrpcServer(std::shared_ptr<core::Engine> engine, ServerOptions options);
  ~GrpcServer();  // shutdown(0) if still running
  GrpcServer(const GrpcServer&) = delete;
  GrpcServer& operator=(const GrpcServer&) = delete;

  int port() const noexcept;  // the bound port
  const ServerOptions& options() const noexcept;
  // grpc.health.v1 status of "" and of the two services by name. Ignored once shutdown began.
  void set_serving(bool serving);
  // Stops accepting: health turns NOT_SERVING and predictions that arrive from now on (on
  // open streams, say) get UNAVAILABLE; in-flight RPCs get up to `grace_ns` to finish, then
  // are cancelled. Returns once every RPC has completed, i.e. once the engine has answered
  // every prediction it was given (its timeouts bound that). Idempotent; concurrent callers
  // all return after the first one's shutdown completed. Does not drain or close the engine
  // (other fronts may share it). Never call it from an engine or gRPC callback thread.
  void shutdown(std::int64_t grace_ns);
  bool shutting_down() const noexcept;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace carrara::server
