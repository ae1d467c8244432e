// TritonExecutor: a native client of a Triton Inference Server (KServe v2 gRPC) on the serving
// hot path, as a core::Executor. No Python anywhere on it.
//
// One executor = one model on one server: a single shared gRPC channel (insecure, 16 MiB
// messages) and stub; every infer() is one asynchronous ModelInfer through grpc++'s callback
// API with the per-call deadline `timeout_ns`, and `done` runs on a gRPC callback thread.
// The grpc types stay out of this header (the generated KServe code lives in
// carrara_server_proto), so the Python binding or a benchmark can include it cheaply.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "carrara/core/executor.hpp"

namespace carrara::server {

struct TritonOptions {
  std::string url;            // host:port
  std::string model;          // Triton model name
  std::string model_version;  // "" = latest
  std::string output;         // "" = the model's first output
  std::int64_t timeout_ns = 1'000'000'000;          // deadline of each ModelInfer
  std::int64_t connect_timeout_ns = 5'000'000'000;  // deadline of the set-up calls
};

// Runs float32 [n, d] batches on a Triton model with exactly one FP32 input of shape [-1, d]
// and an FP32 output of shape [-1, k] (k >= 1) or [-1] (k = 1).
class TritonExecutor final : public core::Executor {
 public:
  // Connects, checks ModelReady and reads ModelMetadata. Throws core::Error:
  //   kUnavailable      "cannot reach Triton at URL: ..." (transport failure, set-up deadline)
  //   kNotFound         "Triton at URL has no ready model 'm'"
  //   kInvalidArgument  empty url/model, or a model whose input/output Carrara cannot feed.
  explicit TritonExecutor(TritonOptions options);
  // Closes (waiting for in-flight calls), then drops the channel. May run inside a `done` of
  // this or another TritonExecutor: the channel is then released on a helper thread, never
  // on the gRPC callback thread (grpc 1.51 cannot destroy its last channel there).
  ~TritonExecutor() override;
  TritonExecutor(const TritonExecutor&) = delete;
  TritonExecutor& operator=(const TritonExecutor&) = delete;

  std::size_t input_dim() const override { return input_dim_; }
  std::size_t output_dim() const override { return output_dim_; }

  // x must be [n, input_dim()]; `done` gets [n, output_dim()] or one of
  //   kInvalidArgument  (x has the wrong shape: at once; or Triton refused the request),
  //   kDeadlineExceeded (no answer within timeout_ns), kUnavailable (closed: at once; or any
  //   other transport/server failure), kInternal (Triton answered with the wrong output).
  // n = 0 answers an empty [0, output_dim()] at once without a call.
  void infer(core::Matrix x, core::InferDone done) override;

  // After it, infer() answers kUnavailable at once. Waits until every in-flight call's `done`
  // has returned (calls are not cancelled: they end by their deadline at the latest).
  // Idempotent; safe to call from inside a `done` of this executor (it then does not wait
  // for that call).
  void close() override;
  bool in_process() const override { return false; }

  const TritonOptions& options() const noexcept { return options_; }
  const std::string& input_name() const noexcept { return input_name_; }
  const std::string& output_name() const noexcept { return output_name_; }
  // "triton:<backend platform>", e.g. "triton:onnxruntime_onnx" (as the Python backend says).
  const std::string& platform() const noexcept { return platform_; }
  // Calls issued whose `done` has not returned yet.
  std::size_t in_flight() const;

  struct Impl;

 private:
  TritonOptions options_;
  std::size_t input_dim_ = 0;
  std::size_t output_dim_ = 0;
  std::string input_name_;
  std::string output_name_;
  std::string platform_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace carrara::server
