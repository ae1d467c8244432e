// TritonExecutor against a real Triton server (nvidia-pytriton 0.7 = Triton 2.51, CPU).
//
// The server is started once for the whole binary from serve_linear.py with the Python named
// by CARRARA_TRITON_PYTHON (build/triton-venv/bin/python, from `make triton-env`). When that
// is unset or missing every test that needs the server is skipped, with a banner on stderr.
#include "carrara/server/triton_executor.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <future>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

using carrara::core::ErrorCode;
using carrara::core::Matrix;
using carrara::core::Status;
using carrara::server::TritonExecutor;
using carrara::server::TritonOptions;
using Clock = std::chrono::steady_clock;

#ifndef CARRARA_TRITON_SERVE_SCRIPT
#error "CARRARA_TRITON_SERVE_SCRIPT must name serve_linear.py"
#endif

// Ports the kernel hands out for bind(0); closed again before use, so a small race remains.
std::vector<int> free_ports(int n) {
  std::vector<int> fds;
  std::vector<int> ports;
  for (int i = 0; i < n; ++i) {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
      ADD_FAILURE() << "cannot bind a free port";
      if (fd >= 0) ::close(fd);
      break;
    }
    socklen_t len = sizeof addr;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
    ports.push_back(ntohs(addr.sin_port));
    fds.push_back(fd);
  }
  for (const int fd : fds) ::close(fd);
  return ports;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string tail(const std::string& s, std::size_t n = 4000) {
  return s.size() <= n ? s : s.substr(s.size() - n);
}

// The Triton server process group, for the whole test binary.
class TritonServer : public ::testing::Environment {
 public:
  static TritonServer* instance;

  void SetUp() override {
    const char* python = std::getenv("CARRARA_TRITON_PYTHON");
    if (python == nullptr || *python == '\0' || ::access(python, X_OK) != 0) {
      skip_reason_ = python == nullptr || *python == '\0'
                         ? "CARRARA_TRITON_PYTHON is not set"
                         : std::string("CARRARA_TRITON_PYTHON=") + python + " is not executable";
      skip_reason_ += " (build the Triton virtualenv with `make triton-env` and point it at "
                      "build/triton-venv/bin/python)";
      std::fprintf(stderr,
                   "\n********************************************************************\n"
                   "*** carrara_triton_tests: SKIPPING every test that needs Triton:\n"
                   "*** %s\n"
                   "********************************************************************\n\n",
                   skip_reason_.c_str());
      return;
    }
    start(python);
  }

  void TearDown() override { stop(); }

  // Empty when the server is up; otherwise why not (skip_reason) or what went wrong (error).
  const std::string& skip_reason() const { return skip_reason_; }
  const std::string& error() const { return error_; }
  const std::string& url() const { return url_; }

 private:
  void start(const std::string& python) {
    const std::vector<int> ports = free_ports(3);
    if (ports.size() != 3) {
      error_ = "no free ports";
      return;
    }
    char dir_template[] = "/tmp/carrara-triton-test-XXXXXX";
    if (::mkdtemp(dir_template) == nullptr) {
      error_ = "mkdtemp failed";
      return;
    }
    dir_ = dir_template;
    log_path_ = dir_ + "/serve.log";
    int stdin_pipe[2];
    if (::pipe(stdin_pipe) != 0) {
      error_ = "pipe failed";
      return;
    }
    const std::string grpc_port = std::to_string(ports[0]);
    const std::string http_port = std::to_string(ports[1]);
    const std::string metrics_port = std::to_string(ports[2]);
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::setpgid(0, 0);
      ::dup2(stdin_pipe[0], 0);
      ::close(stdin_pipe[0]);
      ::close(stdin_pipe[1]);
      const int log = ::open(log_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (log >= 0) {
        ::dup2(log, 1);
        ::dup2(log, 2);
        ::close(log);
      }
      ::execl(python.c_str(), python.c_str(), CARRARA_TRITON_SERVE_SCRIPT, "--grpc-port",
              grpc_port.c_str(), "--http-port", http_port.c_str(), "--metrics-port",
              metrics_port.c_str(), static_cast<char*>(nullptr));
      std::perror("execl");
      ::_exit(127);
    }
    ::close(stdin_pipe[0]);
    if (pid < 0) {
      ::close(stdin_pipe[1]);
      error_ = "fork failed";
      return;
    }
    ::setpgid(pid, pid);  // also from here, so stop() never races the child's own call
    pid_ = pid;
    stdin_fd_ = stdin_pipe[1];
    const auto deadline = Clock::now() + std::chrono::seconds(240);
    const std::string ready = "READY " + grpc_port;
    while (true) {
      const std::string log = read_file(log_path_);
      if (log.find(ready) != std::string::npos) break;
      int wstatus = 0;
      if (::waitpid(pid_, &wstatus, WNOHANG) == pid_) {
        pid_ = -1;
        error_ = "serve_linear.py exited before it was ready:\n" + tail(log);
        return;
      }
      if (Clock::now() > deadline) {
        error_ = "Triton not ready after 240 s:\n" + tail(log);
        stop();
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    url_ = "127.0.0.1:" + grpc_port;
    std::fprintf(stderr, "carrara_triton_tests: Triton ready at %s (log %s)\n", url_.c_str(),
                 log_path_.c_str());
  }

  void stop() {
    if (stdin_fd_ >= 0) {
      ::close(stdin_fd_);  // serve_linear.py stops at end of stdin
      stdin_fd_ = -1;
    }
    if (pid_ > 0) {
      ::kill(-pid_, SIGTERM);
      const auto deadline = Clock::now() + std::chrono::seconds(30);
      int wstatus = 0;
      while (::waitpid(pid_, &wstatus, WNOHANG) == 0) {
        if (Clock::now() > deadline) {
          ::kill(-pid_, SIGKILL);
          ::waitpid(pid_, &wstatus, 0);
          break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
      // Anything left in the group (tritonserver, python stubs) goes too.
      ::kill(-pid_, SIGKILL);
      pid_ = -1;
    }
    if (!dir_.empty() && error_.empty() && std::getenv("CARRARA_KEEP_TRITON_LOG") == nullptr) {
      std::remove(log_path_.c_str());
      ::rmdir(dir_.c_str());
    }
  }

  std::string skip_reason_;
  std::string error_;
  std::string url_;
  std::string dir_;
  std::string log_path_;
  pid_t pid_ = -1;
  int stdin_fd_ = -1;
};

TritonServer* TritonServer::instance =
    static_cast<TritonServer*>(::testing::AddGlobalTestEnvironment(new TritonServer));

#define REQUIRE_TRITON()                                                          \
  do {                                                                            \
    if (!TritonServer::instance->skip_reason().empty()) {                         \
      GTEST_SKIP() << "no Triton: " << TritonServer::instance->skip_reason();     \
    }                                                                             \
    ASSERT_TRUE(TritonServer::instance->error().empty())                          \
        << "Triton did not start: " << TritonServer::instance->error();           \
  } while (0)

TritonOptions options(const std::string& model, std::int64_t timeout_ns = 5'000'000'000) {
  TritonOptions o;
  o.url = TritonServer::instance->url();
  o.model = model;
  o.timeout_ns = timeout_ns;
  return o;
}

struct Result {
  Status status;
  Matrix out;
};

Result run(carrara::core::Executor& ex, Matrix x) {
  std::promise<Result> p;
  auto f = p.get_future();
  ex.infer(std::move(x), [&p](Status s, Matrix m) { p.set_value({std::move(s), std::move(m)}); });
  return f.get();
}

Matrix random_matrix(std::size_t rows, std::size_t cols, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  Matrix m(rows, cols);
  for (float& v : m.data) v = dist(gen);
  return m;
}

// The linear model of serve_linear.py.
float linear(const float* x) { return 0.5f * x[0] - 1.0f * x[1] + 2.0f * x[2] + 0.25f; }

::testing::AssertionResult matches_linear(const Matrix& x, const Result& r) {
  if (!r.status.ok()) return ::testing::AssertionFailure() << "status: " << r.status.message;
  if (r.out.rows != x.rows || r.out.cols != 1 || r.out.data.size() != x.rows) {
    return ::testing::AssertionFailure()
           << "output [" << r.out.rows << ", " << r.out.cols << "] for " << x.rows << " rows";
  }
  for (std::size_t i = 0; i < x.rows; ++i) {
    const float want = linear(x.row(i));
    if (std::fabs(r.out.data[i] - want) > 1e-5f * std::max(1.0f, std::fabs(want))) {
      return ::testing::AssertionFailure()
             << "row " << i << ": got " << r.out.data[i] << ", want " << want;
    }
  }
  return ::testing::AssertionSuccess();
}

template <typename F>
ErrorCode construct_error(F&& make, std::string* message = nullptr) {
  try {
    make();
  } catch (const carrara::core::Error& e) {
    if (message != nullptr) *message = e.what();
    return e.code();
  }
  return ErrorCode::kOk;
}

TEST(TritonExecutor, ReadsMetadataAndMatchesTheLinearFormula) {
  REQUIRE_TRITON();
  TritonExecutor ex(options("linear"));
  EXPECT_EQ(ex.input_dim(), 3u);
  EXPECT_EQ(ex.output_dim(), 1u);
  EXPECT_EQ(ex.input_name(), "features");
  EXPECT_EQ(ex.output_name(), "score");
  EXPECT_EQ(ex.platform(), "triton:python");
  EXPECT_FALSE(ex.in_process());

  const Matrix x = random_matrix(100, 3, 1);
  const Result r = run(ex, x);
  EXPECT_TRUE(matches_linear(x, r));
  const Matrix one = random_matrix(1, 3, 2);
  EXPECT_TRUE(matches_linear(one, run(ex, one)));
  ex.close();  // a call counts as in flight until its `done` has returned
  EXPECT_EQ(ex.in_flight(), 0u);
}

TEST(TritonExecutor, TwoHundredConcurrentInfersFromEightThreads) {
  REQUIRE_TRITON();
  TritonExecutor ex(options("linear"));
  constexpr int kThreads = 8;
  constexpr int kPerThread = 25;
  std::vector<Matrix> inputs;
  for (int i = 0; i < kThreads * kPerThread; ++i) {
    inputs.push_back(random_matrix(1 + static_cast<std::size_t>(i % 7), 3, 100u + i));
  }
  std::vector<Result> results(inputs.size());
  std::mutex mu;
  std::condition_variable cv;
  int remaining = kThreads * kPerThread;
  std::atomic<int> calls{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int j = 0; j < kPerThread; ++j) {
        const int i = t * kPerThread + j;
        ex.infer(inputs[i], [&, i](Status s, Matrix m) {
          calls.fetch_add(1);
          std::lock_guard<std::mutex> lock(mu);
          results[i] = {std::move(s), std::move(m)};
          if (--remaining == 0) cv.notify_all();
        });
      }
    });
  }
  for (auto& th : threads) th.join();
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(60), [&] { return remaining == 0; }))
        << remaining << " calls never answered";
  }
  EXPECT_EQ(calls.load(), kThreads * kPerThread);  // each done exactly once
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    EXPECT_TRUE(matches_linear(inputs[i], results[i])) << "call " << i;
  }
}

TEST(TritonExecutor, DeadlineAgainstTheSlowModel) {
  REQUIRE_TRITON();
  TritonExecutor ex(options("slow", 50'000'000));
  const auto start = Clock::now();
  const Result r = run(ex, random_matrix(2, 3, 3));
  const auto ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count();
  EXPECT_EQ(r.status.code, ErrorCode::kDeadlineExceeded) << r.status.message;
  EXPECT_NE(r.status.message.find("'slow'"), std::string::npos) << r.status.message;
  EXPECT_GE(ms, 45);
  EXPECT_LE(ms, 150);
  EXPECT_TRUE(r.out.data.empty());
}

TEST(TritonExecutor, CloseWaitsForInFlightCalls) {
  REQUIRE_TRITON();
  TritonExecutor ex(options("slow", 5'000'000'000));
  const Matrix x = random_matrix(3, 3, 4);
  std::atomic<bool> answered{false};
  Result result;
  ex.infer(x, [&](Status s, Matrix m) {
    result = {std::move(s), std::move(m)};
    answered = true;
  });
  EXPECT_EQ(ex.in_flight(), 1u);
  ex.close();
  EXPECT_TRUE(answered.load());
  EXPECT_TRUE(matches_linear(x, result));
  EXPECT_EQ(ex.in_flight(), 0u);
}

TEST(TritonExecutor, CloseThenInferIsUnavailableAtOnce) {
  REQUIRE_TRITON();
  TritonExecutor ex(options("linear"));
  ex.close();
  ex.close();  // idempotent
  bool answered = false;
  ex.infer(random_matrix(1, 3, 5), [&](Status s, Matrix m) {
    EXPECT_EQ(s.code, ErrorCode::kUnavailable) << s.message;
    EXPECT_TRUE(m.data.empty());
    answered = true;
  });
  EXPECT_TRUE(answered);  // before infer returned
}

TEST(TritonExecutor, DestroyedInsideItsOwnCallback) {
  REQUIRE_TRITON();
  auto holder = std::make_shared<TritonExecutor>(options("linear"));
  std::promise<Status> p;
  auto f = p.get_future();
  TritonExecutor* ex = holder.get();
  ex->infer(random_matrix(2, 3, 6), [&holder, &p](Status s, Matrix) {
    holder.reset();  // the last owner: ~TritonExecutor runs on the gRPC callback thread
    p.set_value(std::move(s));
  });
  ASSERT_EQ(f.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  EXPECT_TRUE(f.get().ok());
  EXPECT_EQ(holder, nullptr);
  // gRPC's callback threads survived the last channel going away.
  TritonExecutor again(options("linear"));
  const Matrix x = random_matrix(4, 3, 8);
  EXPECT_TRUE(matches_linear(x, run(again, x)));
}

TEST(TritonExecutor, DestroyedInsideAnotherExecutorsCallback) {
  REQUIRE_TRITON();
  auto victim = std::make_shared<TritonExecutor>(options("linear"));
  const Matrix x = random_matrix(3, 3, 9);
  std::promise<Result> victim_result;
  victim->infer(x, [&](Status s, Matrix m) { victim_result.set_value({std::move(s), std::move(m)}); });
  EXPECT_TRUE(matches_linear(x, victim_result.get_future().get()));
  {
    TritonExecutor other(options("linear"));
    std::promise<void> p;
    other.infer(x, [&](Status, Matrix) {
      victim.reset();  // waits for nothing (victim is idle), releases its channel elsewhere
      p.set_value();
    });
    ASSERT_EQ(p.get_future().wait_for(std::chrono::seconds(10)), std::future_status::ready);
  }
  EXPECT_EQ(victim, nullptr);
  TritonExecutor again(options("linear"));
  EXPECT_TRUE(matches_linear(x, run(again, x)));
}

TEST(TritonExecutor, WrongInputShapeIsInvalidArgumentAtOnce) {
  REQUIRE_TRITON();
  TritonExecutor ex(options("linear"));
  bool answered = false;
  ex.infer(Matrix(2, 4), [&](Status s, Matrix) {
    EXPECT_EQ(s.code, ErrorCode::kInvalidArgument);
    EXPECT_EQ(s.message, "model expects float32 [n, 3], got float32 [2, 4]");
    answered = true;
  });
  EXPECT_TRUE(answered);
  const Result empty = run(ex, Matrix(0, 3));
  EXPECT_TRUE(empty.status.ok());
  EXPECT_EQ(empty.out.rows, 0u);
  EXPECT_EQ(empty.out.cols, 1u);
}

TEST(TritonExecutor, UnknownModelIsNotFound) {
  REQUIRE_TRITON();
  std::string message;
  EXPECT_EQ(construct_error([] { TritonExecutor ex(options("nope")); }, &message),
            ErrorCode::kNotFound);
  EXPECT_EQ(message, "Triton at " + TritonServer::instance->url() + " has no ready model 'nope'");
}

TEST(TritonExecutor, UnreachableServerIsUnavailable) {
  // Needs no Triton: a port nothing listens on.
  TritonOptions o;
  o.url = "127.0.0.1:" + std::to_string(free_ports(1).at(0));
  o.model = "linear";
  o.connect_timeout_ns = 3'000'000'000;
  std::string message;
  const auto start = Clock::now();
  EXPECT_EQ(construct_error([&] { TritonExecutor ex(o); }, &message), ErrorCode::kUnavailable);
  EXPECT_EQ(message.rfind("cannot reach Triton at " + o.url + ": ", 0), 0u) << message;
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(3));  // refused fast, not the deadline
}

TEST(TritonExecutor, RefusesModelsItCannotFeed) {
  REQUIRE_TRITON();
  std::string message;
  EXPECT_EQ(construct_error([] { TritonExecutor ex(options("bad")); }, &message),
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(message,
            "Triton model 'bad' input 'features' is INT32 [-1, 3]; Carrara needs FP32 [-1, d]");
  TritonOptions o = options("multi");
  o.output = "zzz";
  EXPECT_EQ(construct_error([&] { TritonExecutor ex(o); }, &message),
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(message, "Triton model 'multi' has no output 'zzz'");
  o.url.clear();
  EXPECT_EQ(construct_error([&] { TritonExecutor ex(o); }), ErrorCode::kInvalidArgument);
}

TEST(TritonExecutor, PicksTheRequestedOutput) {
  REQUIRE_TRITON();
  const Matrix x = random_matrix(5, 3, 7);
  {
    TritonExecutor first(options("multi"));  // "" = the first output, a = row sums
    EXPECT_EQ(first.output_name(), "a");
    EXPECT_EQ(first.output_dim(), 1u);
    const Result r = run(first, x);
    ASSERT_TRUE(r.status.ok()) << r.status.message;
    ASSERT_EQ(r.out.rows, 5u);
    for (std::size_t i = 0; i < 5; ++i) {
      EXPECT_NEAR(r.out.data[i], x.row(i)[0] + x.row(i)[1] + x.row(i)[2], 1e-4);
    }
  }
  TritonOptions o = options("multi");
  o.output = "b";
  TritonExecutor second(o);
  EXPECT_EQ(second.output_dim(), 2u);
  const Result r = run(second, x);
  ASSERT_TRUE(r.status.ok()) << r.status.message;
  ASSERT_EQ(r.out.rows, 5u);
  ASSERT_EQ(r.out.cols, 2u);
  for (std::size_t i = 0; i < 5; ++i) {
    EXPECT_FLOAT_EQ(r.out.row(i)[0], 2 * x.row(i)[0]);
    EXPECT_FLOAT_EQ(r.out.row(i)[1], 2 * x.row(i)[1]);
  }
}

}  // namespace
