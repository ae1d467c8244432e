#include "carrara/server/triton_executor.hpp"

#include <grpcpp/grpcpp.h>

#include <bit>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <mutex>
#include <sstream>
#include <thread>
#include <vector>
#include <utility>

#include "grpc_service.grpc.pb.h"
#include "grpc_service.pb.h"

namespace carrara::server {

using core::Error;
using core::ErrorCode;
using core::Matrix;
using core::Status;

namespace {

constexpr int kMaxMessageBytes = 16 << 20;

// Python's repr of a plain string, as gateway/triton_backend.py prints names.
std::string quoted(const std::string& s) { return "'" + s + "'"; }

template <typename Dims>
std::string dims_str(const Dims& dims) {
  std::ostringstream out;
  out << '[';
  bool first = true;
  for (const auto d : dims) {
    if (!first) out << ", ";
    out << d;
    first = false;
  }
  out << ']';
  return out.str();
}

const char* grpc_code_name(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return "OK";
    case grpc::StatusCode::CANCELLED: return "CANCELLED";
    case grpc::StatusCode::UNKNOWN: return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND: return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS: return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED: return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED: return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE: return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED: return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL: return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE: return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS: return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED: return "UNAUTHENTICATED";
    default: return "UNKNOWN";
  }
}

std::string describe(const grpc::Status& s) {
  std::string out = grpc_code_name(s.error_code());
  if (!s.error_message().empty()) out += ": " + s.error_message();
  return out;
}

std::chrono::system_clock::time_point deadline_after(std::int64_t ns) {
  return std::chrono::system_clock::now() + std::chrono::nanoseconds(ns);
}

// KServe raw tensors are little-endian.
void copy_le_floats(float* dst, const char* src, std::size_t count) {
  std::memcpy(dst, src, count * sizeof(float));
  if constexpr (std::endian::native == std::endian::big) {
    auto* words = reinterpret_cast<std::uint32_t*>(dst);
    for (std::size_t i = 0; i < count; ++i) {
      const std::uint32_t w = words[i];
      words[i] = (w >> 24) | ((w >> 8) & 0xff00u) | ((w << 8) & 0xff0000u) | (w << 24);
    }
  }
}

void append_le_floats(std::string& dst, const float* src, std::size_t count) {
  const std::size_t offset = dst.size();
  dst.resize(offset + count * sizeof(float));
  std::memcpy(dst.data() + offset, src, count * sizeof(float));
  if constexpr (std::endian::native == std::endian::big) {
    for (std::size_t i = 0; i < count; ++i) {
      char* b = dst.data() + offset + i * sizeof(float);
      std::swap(b[0], b[3]);
      std::swap(b[1], b[2]);
    }
  }
}

}  // namespace

struct TritonExecutor::Impl {
  std::string url;
  std::string model;
  std::string version;
  std::string input_name;
  std::string output_name;
  std::int64_t timeout_ns = 0;
  std::size_t input_dim = 0;
  std::size_t output_dim = 0;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<inference::GRPCInferenceService::Stub> stub;

  mutable std::mutex mu;
  std::condition_variable idle;
  std::size_t in_flight = 0;
  bool closed = false;
  bool orphaned = false;  // the executor is gone; the last call to finish disposes of this

  // The last thing a call does with its Impl (unless it is the one to dispose of it).
  void finish_one();

  Status map_error(const grpc::Status& s) const {
    switch (s.error_code()) {
      case grpc::StatusCode::DEADLINE_EXCEEDED:
        return {ErrorCode::kDeadlineExceeded,
                "Triton " + quoted(model) + " did not answer within " +
                    std::to_string(timeout_ns / 1'000'000) + " ms: " + describe(s)};
      case grpc::StatusCode::INVALID_ARGUMENT:
        return {ErrorCode::kInvalidArgument,
                "Triton " + quoted(model) + " refused the request: " + describe(s)};
      default:
        return {ErrorCode::kUnavailable, "Triton " + quoted(model) + " failed: " + describe(s)};
    }
  }

  Status internal(const std::string& what) const {
    return {ErrorCode::kInternal, "Triton " + quoted(model) + " " + what};
  }

  // Checks the response and copies the requested output into out [rows, output_dim].
  Status read_output(const inference::ModelInferResponse& resp, std::size_t rows,
                     Matrix& out) const {
    int index = -1;
    for (int i = 0; i < resp.outputs_size(); ++i) {
      if (resp.outputs(i).name() == output_name) {
        index = i;
        break;
      }
    }
    if (index < 0) return internal("returned no output " + quoted(output_name));
    const auto& tensor = resp.outputs(index);
    if (tensor.datatype() != "FP32") {
      return internal("output " + quoted(output_name) + " is " + tensor.datatype() +
                      "; expected FP32");
    }
    const auto& shape = tensor.shape();
    const auto n = static_cast<std::int64_t>(rows);
    const auto k = static_cast<std::int64_t>(output_dim);
    const bool shape_ok = (shape.size() == 2 && shape[0] == n && shape[1] == k) ||
                          (shape.size() == 1 && shape[0] == n && k == 1);
    if (!shape_ok) {
      return internal("output " + quoted(output_name) + " has shape " + dims_str(shape) +
                      "; expected [" + std::to_string(n) + ", " + std::to_string(k) + "]");
    }
    const std::size_t count = rows * output_dim;
    if (resp.raw_output_contents_size() > 0) {
      if (index >= resp.raw_output_contents_size()) {
        return internal("sent no raw contents for output " + quoted(output_name));
      }
      const std::string& raw = resp.raw_output_contents(index);
      if (raw.size() != count * sizeof(float)) {
        return internal("output " + quoted(output_name) + " has " + std::to_string(raw.size()) +
                        " bytes; expected " + std::to_string(count * sizeof(float)));
      }
      out = Matrix(rows, output_dim);
      copy_le_floats(out.data.data(), raw.data(), count);
      return Status::Ok();
    }
    const auto& values = tensor.contents().fp32_contents();
    if (static_cast<std::size_t>(values.size()) != count) {
      return internal("output " + quoted(output_name) + " has " + std::to_string(values.size()) +
                      " values; expected " + std::to_string(count));
    }
    out = Matrix(rows, output_dim);
    if (count > 0) std::memcpy(out.data.data(), values.data(), count * sizeof(float));
    return Status::Ok();
  }
};

namespace {

// The callbacks of executors running on this thread's stack, so that close() called from a
// `done` does not wait for the call it is inside of.
struct CallbackScope {
  const TritonExecutor::Impl* impl;
  CallbackScope* prev;
  static thread_local CallbackScope* top;

  explicit CallbackScope(const TritonExecutor::Impl* i) : impl(i), prev(top) { top = this; }
  ~CallbackScope() { top = prev; }
  CallbackScope(const CallbackScope&) = delete;
  CallbackScope& operator=(const CallbackScope&) = delete;

  static bool any() { return top != nullptr; }
  static std::size_t depth(const TritonExecutor::Impl* impl) {
    std::size_t n = 0;
    for (const CallbackScope* s = top; s != nullptr; s = s->prev) n += s->impl == impl ? 1 : 0;
    return n;
  }
};
thread_local CallbackScope* CallbackScope::top = nullptr;

// One ModelInfer in flight: the only allocation per call besides what gRPC makes itself.
class InferCall final : public grpc::ClientUnaryReactor {
 public:
  InferCall(TritonExecutor::Impl* impl, std::size_t rows) : impl_(impl), rows_(rows) {}

  grpc::ClientContext ctx;
  inference::ModelInferRequest request;
  inference::ModelInferResponse response;
  core::InferDone done;

  void OnDone(const grpc::Status& s) override {
    // Take what the callback needs, then free the call before running user code.
    TritonExecutor::Impl* impl = impl_;
    core::InferDone fn = std::move(done);
    Status status;
    Matrix out;
    if (!s.ok()) {
      status = impl->map_error(s);
    } else {
      status = impl->read_output(response, rows_, out);
    }
    delete this;
    {
      CallbackScope scope(impl);
      try {
        fn(std::move(status), std::move(out));
      } catch (...) {
        // `done` must not throw; an exception here would end the process on a gRPC thread.
      }
    }
    impl->finish_one();  // after it, `impl` may be gone
  }

 private:
  TritonExecutor::Impl* impl_;
  std::size_t rows_;
};

// Destroys Impls (and so gRPC channels) off the gRPC callback threads. grpc 1.51 runs client
// callbacks on the threads of a process-wide completion queue that the last channel shuts
// down and joins when it is destroyed; from one of those threads that join fails and the
// queue is freed under the running thread (grpc/grpc#37858, #32584). Leaked on purpose: it
// must outlive every executor, including ones destroyed during static destruction.
class Reaper {
 public:
  static void dispose(TritonExecutor::Impl* impl) {
    static Reaper* const reaper = new Reaper();
    {
      std::lock_guard<std::mutex> lock(reaper->mu_);
      reaper->queue_.push_back(impl);
    }
    reaper->cv_.notify_one();
  }

 private:
  Reaper() { std::thread([this] { run(); }).detach(); }

  [[noreturn]] void run() {
    std::vector<TritonExecutor::Impl*> batch;
    while (true) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return !queue_.empty(); });
        batch.swap(queue_);
      }
      for (TritonExecutor::Impl* impl : batch) delete impl;
      batch.clear();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<TritonExecutor::Impl*> queue_;
};

}  // namespace

void TritonExecutor::Impl::finish_one() {
  bool dispose = false;
  {
    std::lock_guard<std::mutex> lock(mu);
    --in_flight;
    if (orphaned && in_flight == 0) {
      dispose = true;
    } else if (in_flight == 0 || closed) {
      // Notified under the lock: a closer woken by this may destroy the Impl at once.
      idle.notify_all();
    }
  }
  if (dispose) Reaper::dispose(this);
}

TritonExecutor::TritonExecutor(TritonOptions options) : options_(std::move(options)) {
  const std::string& url = options_.url;
  if (url.empty()) throw Error(ErrorCode::kInvalidArgument, "Triton url is empty");
  if (options_.model.empty()) {
    throw Error(ErrorCode::kInvalidArgument, "Triton model name is empty");
  }
  if (options_.timeout_ns <= 0 || options_.connect_timeout_ns <= 0) {
    throw Error(ErrorCode::kInvalidArgument, "Triton timeouts must be positive");
  }
  auto impl = std::make_unique<Impl>();
  impl->url = url;
  impl->model = options_.model;
  impl->version = options_.model_version;
  impl->timeout_ns = options_.timeout_ns;

  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(kMaxMessageBytes);
  args.SetMaxSendMessageSize(kMaxMessageBytes);
  impl->channel = grpc::CreateCustomChannel(url, grpc::InsecureChannelCredentials(), args);
  impl->stub = inference::GRPCInferenceService::NewStub(impl->channel);

  const std::string model = quoted(options_.model);
  const auto not_ready = [&] {
    return Error(ErrorCode::kNotFound, "Triton at " + url + " has no ready model " + model);
  };
  const auto set_up_failed = [&](const grpc::Status& s) {
    if (s.error_code() == grpc::StatusCode::NOT_FOUND) return not_ready();
    return Error(ErrorCode::kUnavailable, "cannot reach Triton at " + url + ": " + describe(s));
  };

  {
    grpc::ClientContext ctx;
    ctx.set_deadline(deadline_after(options_.connect_timeout_ns));
    inference::ModelReadyRequest req;
    req.set_name(options_.model);
    req.set_version(options_.model_version);
    inference::ModelReadyResponse resp;
    const grpc::Status s = impl->stub->ModelReady(&ctx, req, &resp);
    if (!s.ok()) throw set_up_failed(s);
    if (!resp.ready()) throw not_ready();
  }

  inference::ModelMetadataResponse meta;
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(deadline_after(options_.connect_timeout_ns));
    inference::ModelMetadataRequest req;
    req.set_name(options_.model);
    req.set_version(options_.model_version);
    const grpc::Status s = impl->stub->ModelMetadata(&ctx, req, &meta);
    if (!s.ok()) throw set_up_failed(s);
  }

  if (meta.inputs_size() != 1) {
    throw Error(ErrorCode::kInvalidArgument, "Triton model " + model + " must have one input");
  }
  const auto& input = meta.inputs(0);
  const auto& in_dims = input.shape();
  if (input.datatype() != "FP32" || in_dims.size() != 2 || in_dims[0] != -1 || in_dims[1] < 1) {
    throw Error(ErrorCode::kInvalidArgument,
                "Triton model " + model + " input " + quoted(input.name()) + " is " +
                    input.datatype() + " " + dims_str(in_dims) + "; Carrara needs FP32 [-1, d]");
  }
  if (meta.outputs_size() == 0) {
    throw Error(ErrorCode::kInvalidArgument, "Triton model " + model + " has no outputs");
  }
  const std::string output_name =
      options_.output.empty() ? meta.outputs(0).name() : options_.output;
  const inference::ModelMetadataResponse::TensorMetadata* output = nullptr;
  for (const auto& o : meta.outputs()) {
    if (o.name() == output_name) {
      output = &o;
      break;
    }
  }
  if (output == nullptr) {
    throw Error(ErrorCode::kInvalidArgument,
                "Triton model " + model + " has no output " + quoted(output_name));
  }
  const auto& out_dims = output->shape();
  std::int64_t k = 0;
  if (out_dims.size() == 2 && out_dims[1] >= 1) {
    k = out_dims[1];
  } else if (out_dims.size() == 1) {
    k = 1;
  }
  if (output->datatype() != "FP32" || k < 1) {
    throw Error(ErrorCode::kInvalidArgument,
                "Triton model " + model + " output " + quoted(output_name) + " is " +
                    output->datatype() + " " + dims_str(out_dims) +
                    "; Carrara needs FP32 [-1, k] or [-1]");
  }

  input_dim_ = static_cast<std::size_t>(in_dims[1]);
  output_dim_ = static_cast<std::size_t>(k);
  input_name_ = input.name();
  output_name_ = output_name;
  platform_ = "triton:" + meta.platform();
  impl->input_name = input_name_;
  impl->output_name = output_name_;
  impl->input_dim = input_dim_;
  impl->output_dim = output_dim_;
  impl_ = std::move(impl);
}

TritonExecutor::~TritonExecutor() {
  if (!impl_) return;
  close();
  if (!CallbackScope::any()) return;  // an ordinary thread: impl_ goes here
  // Inside a `done` (of this executor or another): not on this thread.
  Impl* impl = impl_.release();
  bool dispose_now = false;
  {
    std::lock_guard<std::mutex> lock(impl->mu);
    // What is still in flight is this executor's calls further up this thread's stack; the
    // last of them to finish disposes of the Impl.
    if (impl->in_flight == 0) {
      dispose_now = true;
    } else {
      impl->orphaned = true;
    }
  }
  if (dispose_now) Reaper::dispose(impl);
}

std::size_t TritonExecutor::in_flight() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->in_flight;
}

void TritonExecutor::infer(Matrix x, core::InferDone done) {
  Impl& impl = *impl_;
  if (x.cols != input_dim_ || x.data.size() != x.rows * x.cols) {
    done(Status{ErrorCode::kInvalidArgument,
                "model expects float32 [n, " + std::to_string(input_dim_) + "], got float32 [" +
                    std::to_string(x.rows) + ", " + std::to_string(x.cols) + "]"},
         Matrix());
    return;
  }
  if (x.rows == 0) {
    done(Status::Ok(), Matrix(0, output_dim_));
    return;
  }
  bool admitted = false;
  {
    std::lock_guard<std::mutex> lock(impl.mu);
    if (!impl.closed) {
      ++impl.in_flight;
      admitted = true;
    }
  }
  if (!admitted) {
    done(Status{ErrorCode::kUnavailable, "Triton " + quoted(impl.model) + " executor is closed"},
         Matrix());
    return;
  }
  InferCall* call = nullptr;
  try {
    call = new InferCall(&impl, x.rows);
    inference::ModelInferRequest& req = call->request;
    req.set_model_name(impl.model);
    if (!impl.version.empty()) req.set_model_version(impl.version);
    auto* input = req.add_inputs();
    input->set_name(impl.input_name);
    input->set_datatype("FP32");
    input->add_shape(static_cast<std::int64_t>(x.rows));
    input->add_shape(static_cast<std::int64_t>(x.cols));
    append_le_floats(*req.add_raw_input_contents(), x.data.data(), x.data.size());
    req.add_outputs()->set_name(impl.output_name);
    call->ctx.set_deadline(deadline_after(impl.timeout_ns));
  } catch (const std::exception& e) {
    delete call;
    impl.finish_one();
    done(Status{ErrorCode::kInternal, "Triton " + quoted(impl.model) + ": " + e.what()}, Matrix());
    return;
  }
  call->done = std::move(done);
  impl.stub->async()->ModelInfer(&call->ctx, &call->request, &call->response, call);
  call->StartCall();  // `call` may be gone once this returns
}

void TritonExecutor::close() {
  Impl& impl = *impl_;
  const std::size_t own = CallbackScope::depth(&impl);
  std::unique_lock<std::mutex> lock(impl.mu);
  impl.closed = true;
  impl.idle.wait(lock, [&] { return impl.in_flight <= own; });
}

}  // namespace carrara::server
