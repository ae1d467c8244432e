// kserve_load: an open-loop KServe v2 ModelInfer load generator (grpc++ callback client) that,
// unlike perf_analyzer, keeps going when the server refuses requests, so overload runs can count
// refusals and time them separately from accepted requests.
//
//   kserve_load --target HOST:PORT --model M --entity ID [--rate R] [--duration S]
//               [--channels N] [--max-outstanding K] [--warmup S]
//
// Requests are sent at fixed intervals (1/R) from one pacing thread; each one's latency is
// measured from its intended send time (no coordinated omission). Prints one JSON object:
// offered and achieved rates, and per status code the count and latency percentiles.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "grpc_service.grpc.pb.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  std::string target = "127.0.0.1:8001";
  std::string model = "linear";
  std::string entity = "u0";
  double rate = 1000;
  double duration_s = 5;
  double warmup_s = 1;
  int channels = 4;
  long max_outstanding = 20000;
};

struct Results {
  std::mutex mu;
  std::map<int, std::vector<double>> latency_us;  // by grpc status code
  long backlog = 0;  // not sent: the client already had max_outstanding in flight
};

double percentile(std::vector<double>& v, double q) {
  if (v.empty()) return 0;
  std::size_t k = static_cast<std::size_t>(q * static_cast<double>(v.size() - 1));
  std::nth_element(v.begin(), v.begin() + static_cast<long>(k), v.end());
  return v[k];
}

const char* code_name(int c) {
  static const char* names[] = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT",
                                "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
                                "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
                                "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
                                "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};
  return c >= 0 && c <= 16 ? names[c] : "?";
}

struct Call {
  grpc::ClientContext ctx;
  inference::ModelInferResponse response;
  Clock::time_point intended;
  bool measured = false;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i];
    std::string v = argv[i + 1];
    if (k == "--target") o.target = v;
    else if (k == "--model") o.model = v;
    else if (k == "--entity") o.entity = v;
    else if (k == "--rate") o.rate = std::atof(v.c_str());
    else if (k == "--duration") o.duration_s = std::atof(v.c_str());
    else if (k == "--warmup") o.warmup_s = std::atof(v.c_str());
    else if (k == "--channels") o.channels = std::atoi(v.c_str());
    else if (k == "--max-outstanding") o.max_outstanding = std::atol(v.c_str());
    else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      std::exit(2);
    }
  }
  if (o.rate <= 0 || o.duration_s <= 0 || o.channels < 1) {
    std::fprintf(stderr, "rate, duration and channels must be positive\n");
    std::exit(2);
  }
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  std::vector<std::unique_ptr<inference::GRPCInferenceService::Stub>> stubs;
  for (int i = 0; i < o.channels; ++i) {
    grpc::ChannelArguments args;
    args.SetInt("grpc.channel_id", i);  // distinct channels, not one shared subchannel
    stubs.push_back(inference::GRPCInferenceService::NewStub(
        grpc::CreateCustomChannel(o.target, grpc::InsecureChannelCredentials(), args)));
  }
  inference::ModelInferRequest request;
  request.set_model_name(o.model);
  auto* input = request.add_inputs();
  input->set_name("entity_ids");
  input->set_datatype("BYTES");
  input->add_shape(1);
  std::string raw(4, '\0');
  const auto n = static_cast<std::uint32_t>(o.entity.size());
  std::memcpy(raw.data(), &n, 4);
  raw += o.entity;
  request.add_raw_input_contents(raw);

  Results results;
  std::atomic<long> outstanding{0};
  std::atomic<long> done{0};
  long sent = 0;
  const auto interval = std::chrono::duration<double>(1.0 / o.rate);
  const auto start = Clock::now() + std::chrono::milliseconds(100);
  const auto measure_from = start + std::chrono::duration_cast<Clock::duration>(
                                        std::chrono::duration<double>(o.warmup_s));
  const auto end = measure_from + std::chrono::duration_cast<Clock::duration>(
                                      std::chrono::duration<double>(o.duration_s));
  for (long i = 0;; ++i) {
    const auto intended =
        start + std::chrono::duration_cast<Clock::duration>(interval * static_cast<double>(i));
    if (intended >= end) break;
    std::this_thread::sleep_until(intended);
    const bool measured = intended >= measure_from;
    if (outstanding.load() >= o.max_outstanding) {
      if (measured) {
        std::lock_guard<std::mutex> lock(results.mu);
        ++results.backlog;
      }
      continue;
    }
    auto* call = new Call;
    call->intended = intended;
    call->measured = measured;
    call->ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    outstanding.fetch_add(1);
    if (measured) ++sent;
    stubs[static_cast<std::size_t>(i % o.channels)]->async()->ModelInfer(
        &call->ctx, &request, &call->response, [call, &results, &outstanding, &done](grpc::Status s) {
          const double us =
              std::chrono::duration<double, std::micro>(Clock::now() - call->intended).count();
          if (call->measured) {
            std::lock_guard<std::mutex> lock(results.mu);
            results.latency_us[static_cast<int>(s.error_code())].push_back(us);
          }
          delete call;
          outstanding.fetch_sub(1);
          done.fetch_add(1);
        });
  }
  const auto sent_until = Clock::now();
  while (outstanding.load() > 0 && Clock::now() - sent_until < std::chrono::seconds(35)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  const double measured_s = o.duration_s;
  std::lock_guard<std::mutex> lock(results.mu);
  long answered = 0;
  for (auto& [code, v] : results.latency_us) answered += static_cast<long>(v.size());
  std::printf("{\"offered_rate\": %.1f, \"sent\": %ld, \"sent_rate\": %.1f, \"answered\": %ld, "
              "\"client_backlog\": %ld, \"unanswered\": %ld, \"codes\": {",
              o.rate, sent, static_cast<double>(sent) / measured_s, answered, results.backlog,
              outstanding.load());
  bool first = true;
  for (auto& [code, v] : results.latency_us) {
    const double count = static_cast<double>(v.size());
    const double p50 = percentile(v, 0.50);
    const double p99 = percentile(v, 0.99);
    const double max = v.empty() ? 0 : *std::max_element(v.begin(), v.end());
    std::printf("%s\"%s\": {\"count\": %.0f, \"rate\": %.1f, \"p50_us\": %.0f, \"p99_us\": %.0f, "
                "\"max_us\": %.0f}",
                first ? "" : ", ", code_name(code), count, count / measured_s, p50, p99, max);
    first = false;
  }
  std::printf("}}\n");
  return 0;
}
