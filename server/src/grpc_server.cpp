#include "carrara/server/grpc_server.hpp"

#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <google/protobuf/stubs/logging.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <chrono>
#include <climits>
#include <deque>
#include <map>
#include <mutex>
#include <string_view>
#include <utility>

#include "carrara/server/status.hpp"
#include "carrara/v1/predict.grpc.pb.h"
#include "grpc_service.grpc.pb.h"
#include "kserve_codec.hpp"
#include "model_config.pb.h"

namespace carrara::server {

grpc::StatusCode grpc_code(core::ErrorCode code) noexcept {
  using core::ErrorCode;
  switch (code) {
    case ErrorCode::kOk:
      return grpc::StatusCode::OK;
    case ErrorCode::kInvalidArgument:
    case ErrorCode::kDecode:
      return grpc::StatusCode::INVALID_ARGUMENT;
    case ErrorCode::kNotFound:
      return grpc::StatusCode::NOT_FOUND;
    case ErrorCode::kResourceExhausted:
      return grpc::StatusCode::RESOURCE_EXHAUSTED;
    case ErrorCode::kFailedPrecondition:
      return grpc::StatusCode::FAILED_PRECONDITION;
    case ErrorCode::kDeadlineExceeded:
      return grpc::StatusCode::DEADLINE_EXCEEDED;
    case ErrorCode::kUnavailable:
      return grpc::StatusCode::UNAVAILABLE;
    case ErrorCode::kCancelled:
      return grpc::StatusCode::CANCELLED;
    case ErrorCode::kInternal:
      break;
  }
  return grpc::StatusCode::INTERNAL;
}

grpc::Status grpc_status(const core::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(grpc_code(status.code), status.message);
}

namespace {

using grpc::ByteBuffer;
using grpc::CallbackServerContext;
using grpc::ServerUnaryReactor;
namespace kserve = inference;

constexpr const char* kShuttingDown = "gateway is shutting down; retry on another replica";
constexpr std::size_t kStreamWindow = 64;  // stream requests read but not yet answered

grpc::Status invalid_message(const google::protobuf::MessageLite& message) {
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                      "request is not a valid " + message.GetTypeName());
}

std::string not_deployed(std::string_view model) {
  return "model '" + std::string(model) + "' is not deployed";
}

// Every GRPCInferenceService method as a raw (ByteBuffer) callback method: the front parses
// requests itself, so that undecodable bytes are INVALID_ARGUMENT (generated handlers answer
// INTERNAL), and no method is left synchronous (which would start sync-server threads).
using KServeRawBase = kserve::GRPCInferenceService::WithRawCallbackMethod_ServerLive<
    kserve::GRPCInferenceService::WithRawCallbackMethod_ServerReady<
    kserve::GRPCInferenceService::WithRawCallbackMethod_ModelReady<
    kserve::GRPCInferenceService::WithRawCallbackMethod_ServerMetadata<
    kserve::GRPCInferenceService::WithRawCallbackMethod_ModelMetadata<
    kserve::GRPCInferenceService::WithRawCallbackMethod_ModelInfer<
    kserve::GRPCInferenceService::WithRawCallbackMethod_ModelStreamInfer<
    kserve::GRPCInferenceService::WithRawCallbackMethod_ModelConfig<
    kserve::GRPCInferenceService::WithRawCallbackMethod_ModelStatistics<
    kserve::GRPCInferenceService::WithRawCallbackMethod_RepositoryIndex<
    kserve::GRPCInferenceService::WithRawCallbackMethod_RepositoryModelLoad<
    kserve::GRPCInferenceService::WithRawCallbackMethod_RepositoryModelUnload<
    kserve::GRPCInferenceService::WithRawCallbackMethod_SystemSharedMemoryStatus<
    kserve::GRPCInferenceService::WithRawCallbackMethod_SystemSharedMemoryRegister<
    kserve::GRPCInferenceService::WithRawCallbackMethod_SystemSharedMemoryUnregister<
    kserve::GRPCInferenceService::WithRawCallbackMethod_CudaSharedMemoryStatus<
    kserve::GRPCInferenceService::WithRawCallbackMethod_CudaSharedMemoryRegister<
    kserve::GRPCInferenceService::WithRawCallbackMethod_CudaSharedMemoryUnregister<
    kserve::GRPCInferenceService::WithRawCallbackMethod_TraceSetting<
    kserve::GRPCInferenceService::WithRawCallbackMethod_LogSettings<
    kserve::GRPCInferenceService::Service>>>>>>>>>>>>>>>>>>>>;

using PredictRawBase =
    carrara::v1::Predict::WithRawCallbackMethod_Predict<carrara::v1::Predict::Service>;

class KServeService;
class PredictService;

}  // namespace

// Failures the front answers itself (undecodable tensors, draining) for a deployed model: the
// engine never saw them, but KServe statistics count them as failed inferences (as the Python
// front did).
struct FrontFailures {
  std::uint64_t count = 0;
  std::uint64_t ns = 0;
  std::uint64_t last_ms = 0;
};

struct GrpcServer::Impl {
  Impl(std::shared_ptr<core::Engine> e, ServerOptions o);
  ~Impl();

  bool draining() const noexcept { return draining_.load(std::memory_order_relaxed); }
  // OK when the call carries `authorization: Bearer <t>` with t one of options.auth_tokens,
  // else UNAUTHENTICATED. Only called when tokens are configured (see refused()).
  grpc::Status check_token(const CallbackServerContext& context) const;
  void count_front_failure(const std::string& model, std::int64_t start_ns);
  bool model_ready(const std::string& name, const std::string& version) const;

  std::shared_ptr<core::Engine> engine;
  ServerOptions options;
  std::atomic<bool> draining_{false};
  std::unique_ptr<KServeService> kserve;
  std::unique_ptr<PredictService> predict;
  std::unique_ptr<grpc::Server> server;  // after the services: destroyed before them
  int port = 0;
  std::mutex health_mu;  // orders set_serving against the start of shutdown
  std::once_flag stop_once;
  mutable std::mutex fail_mu;
  std::map<std::string, FrontFailures, std::less<>> front_failures;
};

namespace {

std::uint64_t wall_ms() {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                        std::chrono::system_clock::now().time_since_epoch())
                                        .count());
}

// Finishes the call UNAUTHENTICATED (and returns true) when tokens are configured and it does
// not carry one. Without tokens this is one branch: the default, unauthenticated front pays
// nothing else. Every method calls it first, before the request is parsed.
bool refused(const GrpcServer::Impl* impl, CallbackServerContext* context,
             ServerUnaryReactor* reactor) {
  if (impl->options.auth_tokens.empty()) return false;
  grpc::Status status = impl->check_token(*context);
  if (status.ok()) return false;
  reactor->Finish(std::move(status));
  return true;
}

// A stream refused before it started: finishes with `status` without reading anything.
class RefusedStream final : public grpc::ServerBidiReactor<ByteBuffer, ByteBuffer> {
 public:
  explicit RefusedStream(grpc::Status status) { Finish(std::move(status)); }
  void OnDone() override { delete this; }
};

// Parses the request, runs `fn(request, response)` and finishes the call, all on the calling
// gRPC thread: for the small synchronous KServe methods.
template <class Request, class Response, class Fn>
ServerUnaryReactor* answer(const GrpcServer::Impl* impl, CallbackServerContext* context,
                           const ByteBuffer* in, ByteBuffer* out, Fn&& fn) {
  ServerUnaryReactor* reactor = context->DefaultReactor();
  if (refused(impl, context, reactor)) return reactor;
  Request request;
  if (!detail::parse(*in, request)) {
    reactor->Finish(invalid_message(request));
    return reactor;
  }
  grpc::Status status;
  try {
    Response response;
    fn(request, response);
    detail::serialize(response, *out);
  } catch (const core::Error& e) {
    status = grpc_status(core::Status::From(e));
  } catch (const std::exception& e) {
    status = grpc::Status(grpc::StatusCode::INTERNAL, e.what());
  }
  reactor->Finish(status);
  return reactor;
}

ServerUnaryReactor* unsupported(const GrpcServer::Impl* impl, CallbackServerContext* context,
                                const char* method) {
  ServerUnaryReactor* reactor = context->DefaultReactor();
  if (refused(impl, context, reactor)) return reactor;
  reactor->Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED,
                               std::string(method) + " is not supported by carrara"));
  return reactor;
}

// ModelStreamInfer: requests are decoded as they arrive and predicted concurrently (up to
// kStreamWindow read but unanswered); answers are written in request order, one write at a
// time. Errors are answered in the stream ({error_message}) and the stream goes on. The
// reactor finishes once the client has half-closed (or the call is cancelled) and every
// request it read has been answered, so no engine callback outlives the call.
class StreamReactor final : public grpc::ServerBidiReactor<ByteBuffer, ByteBuffer> {
 public:
  explicit StreamReactor(GrpcServer::Impl* impl) : impl_(impl) {
    reading_ = true;
    StartRead(&in_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // half-close or cancellation
      Actions a;
      {
        std::lock_guard<std::mutex> lock(mu_);
        reading_ = false;
        reads_done_ = true;
        a = plan_locked();
      }
      perform(a);
      return;
    }
    kserve::ModelInferRequest request;
    const bool parsed = detail::parse(in_, request);
    in_.Clear();
    std::uint64_t seq;
    Actions a;
    {
      std::lock_guard<std::mutex> lock(mu_);
      seq = base_ + slots_.size();
      slots_.emplace_back();
      ++unanswered_;
      reading_ = false;
      a = plan_locked();  // may start the next read: requests pipeline
    }
    perform(a);
    if (!parsed) {
      deliver(seq, error_response(invalid_message(request).error_message(), ""));
      return;
    }
    dispatch(seq, request);
  }

  void OnWriteDone(bool ok) override {
    Actions a;
    {
      std::lock_guard<std::mutex> lock(mu_);
      write_pending_ = false;
      if (!ok) broken_ = true;  // the stream is gone; answer nothing more
      a = plan_locked();
    }
    perform(a);
  }

  void OnCancel() override {
    Actions a;
    {
      std::lock_guard<std::mutex> lock(mu_);
      broken_ = true;
      a = plan_locked();
    }
    perform(a);
  }

  void OnDone() override { delete this; }

 private:
  struct Actions {
    bool read = false;
    bool write = false;
    bool finish = false;
    bool cancelled = false;
  };

  static ByteBuffer error_response(const std::string& message, const std::string& id) {
    kserve::ModelStreamInferResponse response;
    response.set_error_message(message);
    // As Triton does: the id tells the client which request failed.
    if (!id.empty()) response.mutable_infer_response()->set_id(id);
    ByteBuffer out;
    detail::serialize(response, out);
    return out;
  }

  void dispatch(std::uint64_t seq, kserve::ModelInferRequest& request) {
    const std::int64_t start = core::steady_now_ns();
    if (impl_->draining()) {
      impl_->count_front_failure(request.model_name(), start);
      deliver(seq, error_response(kShuttingDown, request.id()));
      return;
    }
    core::PredictCall call;
    try {
      call = detail::decode_infer_request(request);
    } catch (const core::Error& e) {
      impl_->count_front_failure(request.model_name(), start);
      deliver(seq, error_response(e.what(), request.id()));
      return;
    }
    // Engine::predict reports every outcome through the callback, exactly once.
    impl_->engine->predict(
        std::move(call), [this, seq, model = std::move(*request.mutable_model_name()),
                          id = std::move(*request.mutable_id())](core::Status status,
                                                                  core::PredictOutcome outcome) {
          ByteBuffer out;
          try {
            if (status.ok()) {
              kserve::ModelStreamInferResponse response;
              detail::encode_infer_response(outcome, model, id, *response.mutable_infer_response());
              detail::serialize(response, out);
            } else {
              out = error_response(status.message, id);
            }
          } catch (const std::exception& e) {
            out = error_response(e.what(), id);
          }
          deliver(seq, std::move(out));
        });
  }

  // An answer for request `seq` is ready.
  void deliver(std::uint64_t seq, ByteBuffer answer) {
    Actions a;
    {
      std::lock_guard<std::mutex> lock(mu_);
      slots_[seq - base_].emplace(std::move(answer));
      --unanswered_;
      a = plan_locked();
    }
    perform(a);
  }

  // Decides, under the lock, what to start next; perform() starts it after unlocking (a
  // reaction may run inline on this thread).
  Actions plan_locked() {
    Actions a;
    if (broken_) {
      // Answers nobody will read: drop them.
      while (!slots_.empty() && slots_.front().has_value()) {
        slots_.pop_front();
        ++base_;
      }
    } else if (!write_pending_ && !slots_.empty() && slots_.front().has_value()) {
      writing_ = std::move(*slots_.front());
      slots_.pop_front();
      ++base_;
      write_pending_ = true;
      a.write = true;
    }
    if (!reading_ && !reads_done_ && !broken_ && slots_.size() < kStreamWindow) {
      reading_ = true;
      a.read = true;
    }
    if (!finished_ && !reading_ && !write_pending_ && unanswered_ == 0 &&
        ((reads_done_ && slots_.empty()) || broken_)) {
      finished_ = true;
      a.finish = true;
      a.cancelled = broken_;
    }
    return a;
  }

  void perform(const Actions& a) {
    if (a.write) StartWrite(&writing_);
    if (a.read) StartRead(&in_);
    // Last: OnDone (which deletes this) may run inside Finish.
    if (a.finish) {
      Finish(a.cancelled ? grpc::Status::CANCELLED : grpc::Status::OK);
    }
  }

  GrpcServer::Impl* impl_;
  ByteBuffer in_;
  ByteBuffer writing_;
  std::mutex mu_;
  std::deque<std::optional<ByteBuffer>> slots_;  // answers in request order, from base_
  std::uint64_t base_ = 0;                       // request number of slots_.front()
  std::size_t unanswered_ = 0;                   // requests read whose answer is not ready
  bool reading_ = false;
  bool reads_done_ = false;
  bool write_pending_ = false;
  bool broken_ = false;  // cancelled, or a write failed
  bool finished_ = false;
};

class KServeService final : public KServeRawBase {
 public:
  explicit KServeService(GrpcServer::Impl* impl) : impl_(impl) {}

  ServerUnaryReactor* ServerLive(CallbackServerContext* c, const ByteBuffer* in,
                                 ByteBuffer* out) override {
    return answer<kserve::ServerLiveRequest, kserve::ServerLiveResponse>(
        impl_, c, in, out, [](const auto&, auto& r) { r.set_live(true); });
  }

  ServerUnaryReactor* ServerReady(CallbackServerContext* c, const ByteBuffer* in,
                                  ByteBuffer* out) override {
    return answer<kserve::ServerReadyRequest, kserve::ServerReadyResponse>(
        impl_, c, in, out,
        [this](const auto&, auto& r) { r.set_ready(!impl_->draining() && impl_->engine->ready()); });
  }

  ServerUnaryReactor* ModelReady(CallbackServerContext* c, const ByteBuffer* in,
                                 ByteBuffer* out) override {
    return answer<kserve::ModelReadyRequest, kserve::ModelReadyResponse>(
        impl_, c, in, out,
        [this](const auto& q, auto& r) { r.set_ready(impl_->model_ready(q.name(), q.version())); });
  }

  ServerUnaryReactor* ServerMetadata(CallbackServerContext* c, const ByteBuffer* in,
                                     ByteBuffer* out) override {
    return answer<kserve::ServerMetadataRequest, kserve::ServerMetadataResponse>(
        impl_, c, in, out, [this](const auto&, auto& r) {
          r.set_name(impl_->options.server_name);
          r.set_version(impl_->options.server_version);
        });
  }

  ServerUnaryReactor* ModelMetadata(CallbackServerContext* c, const ByteBuffer* in,
                                    ByteBuffer* out) override {
    return answer<kserve::ModelMetadataRequest, kserve::ModelMetadataResponse>(
        impl_, c, in, out, [this](const auto& q, auto& r) {
          const core::ModelView view = find(q.name());
          r.set_name(q.name());
          for (const std::string& v : view.versions) r.add_versions(v);
          r.set_platform(std::string(detail::kPlatform));
          auto* input = r.add_inputs();
          input->set_name(std::string(detail::kEntityInput));
          input->set_datatype("BYTES");
          input->add_shape(-1);
          auto* output = r.add_outputs();
          output->set_name(std::string(detail::kOutputName));
          output->set_datatype("FP32");
          output->add_shape(-1);
          output->add_shape(static_cast<std::int64_t>(view.output_dim));
        });
  }

  ServerUnaryReactor* ModelConfig(CallbackServerContext* c, const ByteBuffer* in,
                                  ByteBuffer* out) override {
    return answer<kserve::ModelConfigRequest, kserve::ModelConfigResponse>(
        impl_, c, in, out, [this](const auto& q, auto& r) {
          const core::ModelView view = find(q.name());
          auto* config = r.mutable_config();
          config->set_name(q.name());
          config->set_platform(std::string(detail::kPlatform));
          config->set_backend(std::string(detail::kPlatform));
          config->set_max_batch_size(0);
          auto* input = config->add_input();
          input->set_name(std::string(detail::kEntityInput));
          input->set_data_type(kserve::TYPE_STRING);
          input->add_dims(-1);
          auto* output = config->add_output();
          output->set_name(std::string(detail::kOutputName));
          output->set_data_type(kserve::TYPE_FP32);
          output->add_dims(-1);
          output->add_dims(static_cast<std::int64_t>(view.output_dim));
        });
  }

  ServerUnaryReactor* ModelStatistics(CallbackServerContext* c, const ByteBuffer* in,
                                      ByteBuffer* out) override {
    return answer<kserve::ModelStatisticsRequest, kserve::ModelStatisticsResponse>(
        impl_, c, in, out, [this](const auto& q, auto& r) {
          if (!q.name().empty()) find(q.name());  // NOT_FOUND when unknown
          const std::vector<core::ModelStatsSnapshot> stats = impl_->engine->statistics(q.name());
          std::lock_guard<std::mutex> lock(impl_->fail_mu);
          for (const core::ModelStatsSnapshot& s : stats) {
            FrontFailures front;
            if (auto it = impl_->front_failures.find(s.name); it != impl_->front_failures.end()) {
              front = it->second;
            }
            auto* m = r.add_model_stats();
            m->set_name(s.name);
            m->set_version("");
            m->set_last_inference(std::max(s.last_inference_ms, front.last_ms));
            m->set_inference_count(s.success_count);
            m->set_execution_count(s.success_count);
            auto* is = m->mutable_inference_stats();
            is->mutable_success()->set_count(s.success_count);
            is->mutable_success()->set_ns(s.success_ns);
            is->mutable_fail()->set_count(s.fail_count + front.count);
            is->mutable_fail()->set_ns(s.fail_ns + front.ns);
          }
        });
  }

  ServerUnaryReactor* RepositoryIndex(CallbackServerContext* c, const ByteBuffer* in,
                                      ByteBuffer* out) override {
    return answer<kserve::RepositoryIndexRequest, kserve::RepositoryIndexResponse>(
        impl_, c, in, out, [this](const auto&, auto& r) {
          for (const std::string& name : impl_->engine->models()) {
            const std::optional<core::ModelView> view = impl_->engine->model(name);
            if (!view) continue;  // undeployed meanwhile
            std::vector<std::string> versions = view->versions;
            if (versions.empty()) versions.emplace_back();
            for (const std::string& v : versions) {
              auto* m = r.add_models();
              m->set_name(name);
              m->set_version(v);
              m->set_state("READY");
            }
          }
        });
  }

  ServerUnaryReactor* ModelInfer(CallbackServerContext* context, const ByteBuffer* in,
                                 ByteBuffer* out) override {
    ServerUnaryReactor* reactor = context->DefaultReactor();
    if (refused(impl_, context, reactor)) return reactor;
    const std::int64_t start = core::steady_now_ns();
    kserve::ModelInferRequest request;
    if (!detail::parse(*in, request)) {
      reactor->Finish(invalid_message(request));
      return reactor;
    }
    if (impl_->draining()) {
      impl_->count_front_failure(request.model_name(), start);
      reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, kShuttingDown));
      return reactor;
    }
    core::PredictCall call;
    try {
      call = detail::decode_infer_request(request);
    } catch (const core::Error& e) {
      impl_->count_front_failure(request.model_name(), start);
      reactor->Finish(grpc_status(core::Status::From(e)));
      return reactor;
    }
    // The reply is built and sent from whichever thread completes the prediction (this one
    // for cache hits with a synchronous executor). Engine::predict reports every outcome
    // through the callback, exactly once.
    impl_->engine->predict(
        std::move(call), [reactor, out, model = std::move(*request.mutable_model_name()),
                          id = std::move(*request.mutable_id())](core::Status status,
                                                                  core::PredictOutcome outcome) {
          if (!status.ok()) {
            reactor->Finish(grpc_status(status));
            return;
          }
          try {
            kserve::ModelInferResponse response;
            detail::encode_infer_response(outcome, model, id, response);
            detail::serialize(response, *out);
          } catch (const std::exception& e) {
            reactor->Finish(grpc::Status(grpc::StatusCode::INTERNAL, e.what()));
            return;
          }
          reactor->Finish(grpc::Status::OK);
        });
    return reactor;
  }

  grpc::ServerBidiReactor<ByteBuffer, ByteBuffer>* ModelStreamInfer(
      CallbackServerContext* context) override {
    if (!impl_->options.auth_tokens.empty()) {
      grpc::Status status = impl_->check_token(*context);
      if (!status.ok()) return new RefusedStream(std::move(status));
    }
    return new StreamReactor(impl_);
  }

  ServerUnaryReactor* RepositoryModelLoad(CallbackServerContext* c, const ByteBuffer*,
                                          ByteBuffer*) override {
    return unsupported(impl_, c, "RepositoryModelLoad");
  }
  ServerUnaryReactor* RepositoryModelUnload(CallbackServerContext* c, const ByteBuffer*,
                                            ByteBuffer*) override {
    return unsupported(impl_, c, "RepositoryModelUnload");
  }
  ServerUnaryReactor* SystemSharedMemoryStatus(CallbackServerContext* c, const ByteBuffer*,
                                               ByteBuffer*) override {
    return unsupported(impl_, c, "SystemSharedMemoryStatus");
  }
  ServerUnaryReactor* SystemSharedMemoryRegister(CallbackServerContext* c, const ByteBuffer*,
                                                 ByteBuffer*) override {
    return unsupported(impl_, c, "SystemSharedMemoryRegister");
  }
  ServerUnaryReactor* SystemSharedMemoryUnregister(CallbackServerContext* c, const ByteBuffer*,
                                                   ByteBuffer*) override {
    return unsupported(impl_, c, "SystemSharedMemoryUnregister");
  }
  ServerUnaryReactor* CudaSharedMemoryStatus(CallbackServerContext* c, const ByteBuffer*,
                                             ByteBuffer*) override {
    return unsupported(impl_, c, "CudaSharedMemoryStatus");
  }
  ServerUnaryReactor* CudaSharedMemoryRegister(CallbackServerContext* c, const ByteBuffer*,
                                               ByteBuffer*) override {
    return unsupported(impl_, c, "CudaSharedMemoryRegister");
  }
  ServerUnaryReactor* CudaSharedMemoryUnregister(CallbackServerContext* c, const ByteBuffer*,
                                                 ByteBuffer*) override {
    return unsupported(impl_, c, "CudaSharedMemoryUnregister");
  }
  ServerUnaryReactor* TraceSetting(CallbackServerContext* c, const ByteBuffer*,
                                   ByteBuffer*) override {
    return unsupported(impl_, c, "TraceSetting");
  }
  ServerUnaryReactor* LogSettings(CallbackServerContext* c, const ByteBuffer*,
                                  ByteBuffer*) override {
    return unsupported(impl_, c, "LogSettings");
  }

 private:
  core::ModelView find(const std::string& name) const {
    std::optional<core::ModelView> view = impl_->engine->model(name);
    if (!view) throw core::Error(core::ErrorCode::kNotFound, not_deployed(name));
    return std::move(*view);
  }

  GrpcServer::Impl* impl_;
};

class PredictService final : public PredictRawBase {
 public:
  explicit PredictService(GrpcServer::Impl* impl) : impl_(impl) {}

  ServerUnaryReactor* Predict(CallbackServerContext* context, const ByteBuffer* in,
                              ByteBuffer* out) override {
    ServerUnaryReactor* reactor = context->DefaultReactor();
    if (refused(impl_, context, reactor)) return reactor;
    // On the heap: the entity ids are echoed in the answer.
    auto request = std::make_unique<carrara::v1::PredictRequest>();
    if (!detail::parse(*in, *request)) {
      reactor->Finish(invalid_message(*request));
      return reactor;
    }
    if (impl_->draining()) {
      reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, kShuttingDown));
      return reactor;
    }
    core::PredictCall call = detail::decode_predict_request(*request);
    carrara::v1::PredictRequest* held = request.release();
    impl_->engine->predict(std::move(call), [reactor, out, held](core::Status status,
                                                                 core::PredictOutcome outcome) {
      std::unique_ptr<carrara::v1::PredictRequest> request(held);
      if (!status.ok()) {
        reactor->Finish(grpc_status(status));
        return;
      }
      try {
        carrara::v1::PredictResponse response;
        detail::encode_predict_response(outcome, *request, response);
        detail::serialize(response, *out);
      } catch (const std::exception& e) {
        reactor->Finish(grpc::Status(grpc::StatusCode::INTERNAL, e.what()));
        return;
      }
      reactor->Finish(grpc::Status::OK);
    });
    return reactor;
  }

 private:
  GrpcServer::Impl* impl_;
};

// Equal contents, in time that depends only on the lengths: every byte of `expected` is
// looked at whatever `presented` holds, so timing tells nothing about how much matched.
bool constant_time_equal(std::string_view presented, std::string_view expected) noexcept {
  unsigned char diff = presented.size() == expected.size() ? 0 : 1;
  for (std::size_t i = 0; i < expected.size(); ++i) {
    const unsigned char p = i < presented.size() ? static_cast<unsigned char>(presented[i]) : 0;
    diff |= static_cast<unsigned char>(p ^ static_cast<unsigned char>(expected[i]));
  }
  return diff == 0;
}

bool ascii_iequal(std::string_view a, std::string_view b) noexcept {
  if (a.size() != b.size()) return false;
  const auto lower = [](char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c + 32) : c; };
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (lower(a[i]) != lower(b[i])) return false;
  }
  return true;
}

std::shared_ptr<grpc::ServerCredentials> server_credentials(const ServerOptions& o) {
  const bool cert = !o.tls_cert_chain.empty();
  const bool key = !o.tls_private_key.empty();
  if (cert != key) {
    throw core::Error(core::ErrorCode::kInvalidArgument,
                      "TLS needs both a certificate chain and a private key");
  }
  if (!cert) {
    if (!o.tls_client_ca.empty()) {
      throw core::Error(core::ErrorCode::kInvalidArgument,
                        "tls_client_ca (client certificates) needs TLS: set a certificate and key");
    }
    return grpc::InsecureServerCredentials();
  }
  grpc::SslServerCredentialsOptions ssl(
      o.tls_client_ca.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                              : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  ssl.pem_root_certs = o.tls_client_ca;
  ssl.pem_key_cert_pairs.push_back({o.tls_private_key, o.tls_cert_chain});
  return grpc::SslServerCredentials(ssl);
}

std::string listen_address(const std::string& host, int port) {
  const bool ipv6 = host.find(':') != std::string::npos && host.front() != '[';
  return (ipv6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

}  // namespace

GrpcServer::Impl::Impl(std::shared_ptr<core::Engine> e, ServerOptions o)
    : engine(std::move(e)), options(std::move(o)) {
  if (!engine) throw core::Error(core::ErrorCode::kInvalidArgument, "GrpcServer needs an engine");
  if (options.port < 0 || options.port > 65535) {
    throw core::Error(core::ErrorCode::kInvalidArgument,
                      "port must be in [0, 65535], got " + std::to_string(options.port));
  }
  if (options.host.empty()) throw core::Error(core::ErrorCode::kInvalidArgument, "host is empty");
  if (options.max_message_bytes == 0) {
    throw core::Error(core::ErrorCode::kInvalidArgument, "max_message_bytes must be > 0");
  }
  for (const std::string& token : options.auth_tokens) {
    if (token.empty()) {
      throw core::Error(core::ErrorCode::kInvalidArgument, "an auth token is empty");
    }
  }
  std::shared_ptr<grpc::ServerCredentials> credentials = server_credentials(options);
  const bool tls = !options.tls_cert_chain.empty();
  kserve = std::make_unique<KServeService>(this);
  predict = std::make_unique<PredictService>(this);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  const std::string address = listen_address(options.host, options.port);
  builder.AddListeningPort(address, credentials, &port);
  // grpc sets SO_REUSEPORT by default: a second server on a taken port would "bind" and share
  // (or steal) its traffic instead of failing.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  const int limit = static_cast<int>(std::min<std::size_t>(options.max_message_bytes, INT_MAX));
  builder.SetMaxReceiveMessageSize(limit);
  builder.SetMaxSendMessageSize(limit);
  builder.RegisterService(kserve.get());
  builder.RegisterService(predict.get());
  server = builder.BuildAndStart();
  if (!server || port == 0) {
    server.reset();
    throw core::Error(core::ErrorCode::kUnavailable,
                      "cannot listen on " + address +
                          (tls ? " (with TLS: are the certificate and key valid PEM, and a pair?)"
                               : ""));
  }
}

GrpcServer::Impl::~Impl() = default;

void GrpcServer::Impl::count_front_failure(const std::string& model, std::int64_t start_ns) {
  if (!engine->model(model)) return;  // only deployed models have statistics
  const auto ns = static_cast<std::uint64_t>(std::max<std::int64_t>(0, core::steady_now_ns() - start_ns));
  std::lock_guard<std::mutex> lock(fail_mu);
  auto it = front_failures.find(model);
  if (it == front_failures.end()) it = front_failures.emplace(model, FrontFailures{}).first;
  ++it->second.count;
  it->second.ns += ns;
  it->second.last_ms = wall_ms();
}

grpc::Status GrpcServer::Impl::check_token(const CallbackServerContext& context) const {
  constexpr std::string_view kScheme = "bearer";
  const auto& metadata = context.client_metadata();
  const auto it = metadata.find("authorization");
  if (it == metadata.end()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "this gateway requires a bearer token: send the metadata "
                        "'authorization: Bearer <token>'");
  }
  std::string_view value(it->second.data(), it->second.size());
  if (value.size() <= kScheme.size() || !ascii_iequal(value.substr(0, kScheme.size()), kScheme) ||
      (value[kScheme.size()] != ' ' && value[kScheme.size()] != '\t')) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "the authorization metadata must be 'Bearer <token>'");
  }
  value.remove_prefix(kScheme.size());
  while (!value.empty() && (value.front() == ' ' || value.front() == '\t')) value.remove_prefix(1);
  // Every configured token is compared in full, whichever matches.
  bool match = false;
  for (const std::string& token : options.auth_tokens) match |= constant_time_equal(value, token);
  if (!match) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "the bearer token is not accepted");
  }
  return grpc::Status::OK;
}

bool GrpcServer::Impl::model_ready(const std::string& name, const std::string& version) const {
  if (draining() || engine->draining()) return false;
  const std::optional<core::ModelView> view = engine->model(name);
  if (!view) return false;
  return version.empty() ||
         std::find(view->versions.begin(), view->versions.end(), version) != view->versions.end();
}

namespace {

// libprotobuf logs one ERROR line for every string field with invalid UTF-8 it parses; here
// that is a client's bad bytes, answered INVALID_ARGUMENT — a line per request would let any
// client flood the log. Other protobuf messages still go to stderr.
void protobuf_log(google::protobuf::LogLevel level, const char* filename, int line,
                  const std::string& message) {
  if (message.find("invalid UTF-8") != std::string::npos) return;
  static const char* const kLevels[] = {"INFO", "WARNING", "ERROR", "FATAL"};
  const int l = static_cast<int>(level);
  std::fprintf(stderr, "[libprotobuf %s %s:%d] %s\n", l >= 0 && l < 4 ? kLevels[l] : "LOG",
               filename, line, message.c_str());
}

}  // namespace

GrpcServer::GrpcServer(std::shared_ptr<core::Engine> engine, ServerOptions options)
    : impl_(std::make_unique<Impl>(std::move(engine), std::move(options))) {
  static std::once_flag quiet;
  std::call_once(quiet, [] { google::protobuf::SetLogHandler(&protobuf_log); });
  set_serving(true);
}

GrpcServer::~GrpcServer() { shutdown(0); }

int GrpcServer::port() const noexcept { return impl_->port; }

const ServerOptions& GrpcServer::options() const noexcept { return impl_->options; }

bool GrpcServer::shutting_down() const noexcept { return impl_->draining(); }

void GrpcServer::set_serving(bool serving) {
  std::lock_guard<std::mutex> lock(impl_->health_mu);
  if (impl_->draining()) return;
  grpc::HealthCheckServiceInterface* health = impl_->server->GetHealthCheckService();
  if (!health) return;
  for (const char* service : {"", "carrara.v1.Predict", "inference.GRPCInferenceService"}) {
    health->SetServingStatus(service, serving);
  }
}

void GrpcServer::shutdown(std::int64_t grace_ns) {
  {
    std::lock_guard<std::mutex> lock(impl_->health_mu);
    if (!impl_->draining_.exchange(true)) {
      if (grpc::HealthCheckServiceInterface* health = impl_->server->GetHealthCheckService()) {
        health->SetServingStatus(false);
      }
    }
  }
  // Concurrent callers wait here until the first one's shutdown has completed.
  std::call_once(impl_->stop_once, [&] {
    const auto deadline = std::chrono::system_clock::now() +
                          std::chrono::nanoseconds(std::max<std::int64_t>(0, grace_ns));
    // Stops listening, lets in-flight calls finish until the deadline, then cancels the rest;
    // returns once every call is done (a unary call is done when its engine callback has
    // finished it, a stream when every request it read has been answered).
    impl_->server->Shutdown(deadline);
    impl_->server->Wait();
  });
}

}  // namespace carrara::server
