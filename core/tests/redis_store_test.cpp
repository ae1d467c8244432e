// RedisStore against the real Redis at 127.0.0.1:6379 (skipped, loudly, only when none is
// running), and against FakeRedis, an in-process loopback server standing in for a hung, slow
// or broken Redis: no process control here, nothing is stopped or killed but our own sockets.
#include <gtest/gtest.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <latch>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "carrara/core/redis_store.hpp"
#include "test_util.hpp"

namespace carrara::core {
namespace {

using std::chrono::milliseconds;
using testing::expect_error;
using Values = std::vector<std::optional<std::string>>;

constexpr const char* kRedisHost = "127.0.0.1";
constexpr int kRedisPort = 6379;
const std::string kRedisUrl = "redis://127.0.0.1:6379";

std::int64_t now() { return RedisStore::now_ns(); }
std::int64_t in_ms(std::int64_t ms) { return now() + ms * 1'000'000; }
double elapsed_ms(std::int64_t since) { return static_cast<double>(now() - since) / 1e6; }

// A unique namespace per test: tests may run in parallel processes against one Redis.
std::string unique_prefix() {
  static std::atomic<int> counter{0};
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  return std::string("carrara-test:") + info->test_suite_name() + "." + info->name() + ":" +
         std::to_string(getpid()) + ":" + std::to_string(counter.fetch_add(1)) + ":";
}

// A port nothing listens on (bound, then released).
int closed_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  EXPECT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  socklen_t len = sizeof addr;
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

// ---- a direct hiredis connection for setting up and cleaning up ------------------------------

struct ReplyFree {
  void operator()(redisReply* r) const noexcept { freeReplyObject(r); }
};
using ReplyPtr = std::unique_ptr<redisReply, ReplyFree>;

class RawRedis {
 public:
  // nullptr when no Redis answers at kRedisHost:kRedisPort.
  static std::unique_ptr<RawRedis> connect() {
    redisContext* c = redisConnectWithTimeout(kRedisHost, kRedisPort, timeval{0, 500'000});
    if (c == nullptr) return nullptr;
    auto raw = std::unique_ptr<RawRedis>(new RawRedis(c));
    if (c->err != 0) return nullptr;
    ReplyPtr pong = raw->command({"PING"});
    if (!pong || pong->type != REDIS_REPLY_STATUS) return nullptr;
    return raw;
  }
  ~RawRedis() { redisFree(c_); }

  ReplyPtr command(const std::vector<std::string>& args) {
    std::vector<const char*> argv;
    std::vector<std::size_t> argl;
    for (const std::string& a : args) {
      argv.push_back(a.data());
      argl.push_back(a.size());
    }
    return ReplyPtr(static_cast<redisReply*>(
        redisCommandArgv(c_, static_cast<int>(args.size()), argv.data(), argl.data())));
  }

  void set(const std::string& key, const std::string& value) {
    ReplyPtr r = command({"SET", key, value});
    ASSERT_TRUE(r && r->type == REDIS_REPLY_STATUS) << "SET " << key;
  }

  void select(int db) {
    ReplyPtr r = command({"SELECT", std::to_string(db)});
    ASSERT_TRUE(r && r->type == REDIS_REPLY_STATUS) << "SELECT " << db;
  }

  // Deletes every key under `prefix` in the current database.
  void delete_prefix(const std::string& prefix) {
    std::string cursor = "0";
    do {
      ReplyPtr r = command({"SCAN", cursor, "MATCH", prefix + "*", "COUNT", "1000"});
      if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 2) return;
      cursor.assign(r->element[0]->str, r->element[0]->len);
      const redisReply* keys = r->element[1];
      for (std::size_t i = 0; i < keys->elements; ++i) {
        command({"DEL", std::string(keys->element[i]->str, keys->element[i]->len)});
      }
    } while (cursor != "0");
  }

 private:
  explicit RawRedis(redisContext* c) : c_(c) {}
  redisContext* c_;
};

// ---- FakeRedis: a sick Redis in the test process ----------------------------------------------

// A loopback server. Connection i (0-based) is served by modes[i], later ones by modes.back():
//   kStall:   reads and drops requests, never answers (a hung Redis);
//   kForward: pipes bytes to and from the real Redis;
//   kDelay:   as kForward, but holds each reply for `delay` (a slow Redis, late replies);
//   kCanned:  answers every request with `canned` (a broken or foreign server);
//   kClose:   closes each connection as soon as it is accepted (a crashing server).
class FakeRedis {
 public:
  enum class Mode { kStall, kForward, kDelay, kCanned, kClose };
  struct Options {
    std::vector<Mode> modes;
    milliseconds delay{0};
    std::string canned;
    std::string unix_path;  // listen here instead of on a TCP port
  };

  explicit FakeRedis(std::vector<Mode> modes, milliseconds delay = {}, std::string canned = {},
                     std::string unix_path = {})
      : options_{std::move(modes), delay, std::move(canned), std::move(unix_path)} {
    if (options_.unix_path.empty()) {
      listen_fd_ = socket(AF_INET, SOCK_STREAM, 0);
      sockaddr_in addr{};
      addr.sin_family = AF_INET;
      addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      if (bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
        ADD_FAILURE() << "bind: " << std::strerror(errno);
      }
      socklen_t len = sizeof addr;
      getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
      port_ = ntohs(addr.sin_port);
    } else {
      listen_fd_ = socket(AF_UNIX, SOCK_STREAM, 0);
      sockaddr_un addr{};
      addr.sun_family = AF_UNIX;
      std::strncpy(addr.sun_path, options_.unix_path.c_str(), sizeof addr.sun_path - 1);
      unlink(options_.unix_path.c_str());
      if (bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
        ADD_FAILURE() << "bind " << options_.unix_path << ": " << std::strerror(errno);
      }
    }
    listen(listen_fd_, 64);
    acceptor_ = std::thread([this] { accept_loop(); });
  }

  ~FakeRedis() {
    stop_ = true;
    acceptor_.join();
    std::lock_guard<std::mutex> lock(mu_);
    for (std::thread& t : workers_) t.join();
    close(listen_fd_);
    if (!options_.unix_path.empty()) unlink(options_.unix_path.c_str());
  }

  std::string url() const { return "redis://127.0.0.1:" + std::to_string(port_); }
  // Connections accepted, and connections closed by the client (or failed). The acceptor and
  // the workers poll, so on a loaded machine they lag the client: each waits up to a second
  // for `at_least`.
  int accepted(int at_least = 0) const { return wait_for(accepted_, at_least); }
  int closed(int at_least = 0) const { return wait_for(closed_, at_least); }

 private:
  void accept_loop() {
    while (!stop_) {
      pollfd p{listen_fd_, POLLIN, 0};
      if (poll(&p, 1, 10) <= 0) continue;
      const int fd = accept(listen_fd_, nullptr, nullptr);
      if (fd < 0) continue;
      const std::size_t i = static_cast<std::size_t>(accepted_.fetch_add(1));
      const Mode mode = options_.modes[std::min(i, options_.modes.size() - 1)];
      std::lock_guard<std::mutex> lock(mu_);
      workers_.emplace_back([this, fd, mode] { serve(fd, mode); });
    }
  }

  static int wait_for(const std::atomic<int>& count, int at_least) {
    const auto until = std::chrono::steady_clock::now() + milliseconds(1000);
    while (count.load() < at_least && std::chrono::steady_clock::now() < until) {
      std::this_thread::sleep_for(milliseconds(1));
    }
    return count.load();
  }

  static bool send_all(int fd, const char* data, std::size_t size) {
    while (size > 0) {
      const ssize_t k = send(fd, data, size, MSG_NOSIGNAL);
      if (k <= 0) return false;
      data += k;
      size -= static_cast<std::size_t>(k);
    }
    return true;
  }

  static int connect_upstream() {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(kRedisPort);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
      close(fd);
      return -1;
    }
    return fd;
  }

  void serve(int fd, Mode mode) {
    const bool forward = mode == Mode::kForward || mode == Mode::kDelay;
    const int up = forward ? connect_upstream() : -1;
    std::vector<char> buf(1 << 16);
    while (!stop_ && (!forward || up >= 0) && mode != Mode::kClose) {
      pollfd p[2] = {{fd, POLLIN, 0}, {up, POLLIN, 0}};
      if (poll(p, up >= 0 ? 2 : 1, 10) <= 0) continue;
      if (p[0].revents != 0) {
        const ssize_t k = recv(fd, buf.data(), buf.size(), 0);
        if (k <= 0) break;
        if (mode == Mode::kCanned &&
            !send_all(fd, options_.canned.data(), options_.canned.size())) {
          break;
        }
        if (forward && !send_all(up, buf.data(), static_cast<std::size_t>(k))) break;
      }
      if (up >= 0 && p[1].revents != 0) {
        const ssize_t k = recv(up, buf.data(), buf.size(), 0);
        if (k <= 0) break;
        if (mode == Mode::kDelay) std::this_thread::sleep_for(options_.delay);
        if (!send_all(fd, buf.data(), static_cast<std::size_t>(k))) break;
      }
    }
    closed_.fetch_add(1);
    close(fd);
    if (up >= 0) close(up);
  }

  Options options_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<int> accepted_{0};
  std::atomic<int> closed_{0};
  std::thread acceptor_;
  std::mutex mu_;
  std::vector<std::thread> workers_;
};

using Mode = FakeRedis::Mode;

// ---- URL parsing ------------------------------------------------------------------------------

TEST(RedisUrl, ParsesTcpForms) {
  RedisEndpoint e = parse_redis_url("redis://127.0.0.1:6380/2");
  EXPECT_EQ(e.host, "127.0.0.1");
  EXPECT_EQ(e.port, 6380);
  EXPECT_EQ(e.db, 2);
  EXPECT_TRUE(e.unix_path.empty());
  EXPECT_TRUE(e.password.empty());

  e = parse_redis_url("redis://cache.internal");
  EXPECT_EQ(e.host, "cache.internal");
  EXPECT_EQ(e.port, 6379);
  EXPECT_EQ(e.db, 0);

  e = parse_redis_url("redis://:s%40cret%2F@h:1/");
  EXPECT_EQ(e.user, "");
  EXPECT_EQ(e.password, "s@cret/");
  EXPECT_EQ(e.port, 1);
  EXPECT_EQ(e.db, 0);

  e = parse_redis_url("redis://alice:pw@[::1]:7000/15");
  EXPECT_EQ(e.user, "alice");
  EXPECT_EQ(e.password, "pw");
  EXPECT_EQ(e.host, "::1");
  EXPECT_EQ(e.port, 7000);
  EXPECT_EQ(e.db, 15);

  e = parse_redis_url("redis://h?db=4");
  EXPECT_EQ(e.db, 4);
  e = parse_redis_url("redis://127.0.0.1:6379/0?namespace=run%3A1+a");  // as parse_qs reads it
  EXPECT_EQ(e.key_namespace, "run:1 a");
  EXPECT_EQ(e.db, 0);
  EXPECT_EQ(parse_redis_url("redis://").host, "localhost");
}

TEST(RedisUrl, ParsesUnixForms) {
  RedisEndpoint e = parse_redis_url("unix:///run/redis/redis.sock");
  EXPECT_EQ(e.unix_path, "/run/redis/redis.sock");
  EXPECT_TRUE(e.host.empty());
  EXPECT_EQ(e.db, 0);

  e = parse_redis_url("unix:///tmp/r.sock?db=3");
  EXPECT_EQ(e.unix_path, "/tmp/r.sock");
  EXPECT_EQ(e.db, 3);

  e = parse_redis_url("unix://:pw@/tmp/r%20x.sock");
  EXPECT_EQ(e.password, "pw");
  EXPECT_EQ(e.unix_path, "/tmp/r x.sock");
}

TEST(RedisUrl, RejectsBadUrlsWithTheReason) {
  auto parse = [](const char* url) { return [url] { parse_redis_url(url); }; };
  expect_error(parse("rediss://h:6379"), ErrorCode::kInvalidArgument, {"TLS", "rediss://"});
  expect_error(parse("http://h"), ErrorCode::kInvalidArgument, {"unknown scheme 'http'"});
  expect_error(parse("127.0.0.1:6379"), ErrorCode::kInvalidArgument, {"expected redis://"});
  expect_error(parse("redis://h:0"), ErrorCode::kInvalidArgument, {"port '0'"});
  expect_error(parse("redis://h:99999"), ErrorCode::kInvalidArgument, {"port '99999'"});
  expect_error(parse("redis://h:port"), ErrorCode::kInvalidArgument, {"port 'port'"});
  expect_error(parse("redis://h:"), ErrorCode::kInvalidArgument, {"empty port"});
  expect_error(parse("redis://h/x"), ErrorCode::kInvalidArgument, {"database 'x'"});
  expect_error(parse("redis://h/-1"), ErrorCode::kInvalidArgument, {"database '-1'"});
  expect_error(parse("redis://h/1?db=2"), ErrorCode::kInvalidArgument, {"given twice"});
  expect_error(parse("redis://h?timeout=3"), ErrorCode::kInvalidArgument,
               {"unknown parameter 'timeout'", "known: db, namespace"});
  expect_error(parse("redis://h?cluster=1"), ErrorCode::kInvalidArgument, {"Redis Cluster"});
  expect_error(parse("redis://[::1:6379"), ErrorCode::kInvalidArgument, {"unclosed '['"});
  expect_error(parse("unix://tmp/r.sock"), ErrorCode::kInvalidArgument, {"absolute socket path"});
  expect_error(parse("unix://"), ErrorCode::kInvalidArgument, {"absolute socket path"});
  expect_error(parse("redis://secret@h"), ErrorCode::kInvalidArgument, {"user:password"});
  expect_error(parse("redis://bob:@h"), ErrorCode::kInvalidArgument, {"'bob' has no password"});
  expect_error(parse("redis://:%zz@h"), ErrorCode::kInvalidArgument, {"percent-encoding"});
  // The password never appears in a message.
  const std::string msg =
      expect_error(parse("redis://bob:hunter2@h:bad"), ErrorCode::kInvalidArgument, {"***"});
  EXPECT_EQ(msg.find("hunter2"), std::string::npos) << msg;
}

TEST(RedisUrl, DescribeMasksThePassword) {
  EXPECT_EQ(parse_redis_url("redis://bob:hunter2@h:1/2").describe(), "redis://bob:***@h:1/2");
  EXPECT_EQ(parse_redis_url("redis://:hunter2@h").describe(), "redis://:***@h:6379/0");
  EXPECT_EQ(parse_redis_url("redis://[::1]").describe(), "redis://[::1]:6379/0");
  EXPECT_EQ(parse_redis_url("unix:///s.sock?db=2").describe(), "unix:///s.sock?db=2");
  EXPECT_EQ(parse_redis_url("unix:///s.sock?namespace=x&db=2").describe(),
            "unix:///s.sock?db=2&namespace=x");
  EXPECT_EQ(parse_redis_url("redis://h/1?namespace=x").describe(), "redis://h:6379/1?namespace=x");
}

TEST(RedisStoreOptions, AreValidated) {
  auto make = [](RedisStoreOptions o) { return [o] { RedisStore s(kRedisUrl, "", o); }; };
  RedisStoreOptions o;
  o.connect_timeout_ns = 0;
  expect_error(make(o), ErrorCode::kInvalidArgument, {"connect_timeout_ns"});
  o = {};
  o.default_timeout_ns = -1;
  expect_error(make(o), ErrorCode::kInvalidArgument, {"default_timeout_ns"});
  o = {};
  o.down_backoff_ns = -1;
  expect_error(make(o), ErrorCode::kInvalidArgument, {"down_backoff_ns"});
  o = {};
  o.max_keys_per_command = 0;
  expect_error(make(o), ErrorCode::kInvalidArgument, {"max_keys_per_command"});
  o = {};
  o.client_name = "two words";
  expect_error(make(o), ErrorCode::kInvalidArgument, {"client_name"});
  expect_error([] { RedisStore s("memcached://h"); }, ErrorCode::kInvalidArgument,
               {"unknown scheme"});
}

// ---- against the real Redis ------------------------------------------------------------------

class RedisStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    raw_ = RawRedis::connect();
    if (!raw_) {
      GTEST_SKIP() << "\n\n*** NO REDIS at " << kRedisHost << ":" << kRedisPort
                   << ": SKIPPING the RedisStore tests that need one. Start redis-server (CI "
                      "must have it). ***\n";
    }
    prefix_ = unique_prefix();
  }

  void TearDown() override {
    if (!raw_) return;
    for (int db : dbs_used_) {
      raw_->select(db);
      raw_->delete_prefix(prefix_);
    }
    raw_->select(0);
    raw_->delete_prefix(prefix_);
  }

  // A key of this test (the store under test gets no prefix unless the test says so).
  std::string key(const std::string& name) const { return prefix_ + name; }

  std::unique_ptr<RawRedis> raw_;
  std::string prefix_;
  std::vector<int> dbs_used_;
};

TEST_F(RedisStoreTest, ValuesEqualWhatWasSet) {
  const std::string nul_value("a\0b\r\n$3\r\nxyz\0", 14);
  const std::string nul_key = key(std::string("k\0ey \r\n", 7));
  std::string all_bytes;
  for (int b = 0; b < 256; ++b) all_bytes.push_back(static_cast<char>(b));
  raw_->set(key("nul"), nul_value);
  raw_->set(key("empty"), "");
  raw_->set(nul_key, "under a binary key");
  raw_->set(key("bytes"), all_bytes);
  raw_->set(key("utf8"), "caf\xc3\xa9");

  RedisStore store(kRedisUrl);
  const std::vector<std::string> keys = {key("nul"),  key("absent"), key("empty"), nul_key,
                                         key("bytes"), key("nul"),    key("utf8")};
  Values out = {std::string("stale")};  // replaced, not appended to
  store.mget(keys, out, in_ms(1000));
  ASSERT_EQ(out.size(), keys.size());
  EXPECT_EQ(out[0], nul_value);
  EXPECT_EQ(out[0]->size(), 14u);
  EXPECT_EQ(out[1], std::nullopt);
  EXPECT_EQ(out[2], std::string());
  EXPECT_EQ(out[3], "under a binary key");
  EXPECT_EQ(out[4], all_bytes);
  EXPECT_EQ(out[5], nul_value);
  EXPECT_EQ(out[6], "caf\xc3\xa9");

  // Only absent keys; a key that holds a hash reads as absent (MGET's rule).
  raw_->command({"HSET", key("hash"), "f", "v"});
  store.mget(std::vector<std::string>{key("nope"), key("hash")}, out, in_ms(1000));
  EXPECT_EQ(out, (Values{std::nullopt, std::nullopt}));

  const RedisStoreStats s = store.stats();
  EXPECT_EQ(s.calls, 2u);
  EXPECT_EQ(s.failures, 0u);
  EXPECT_EQ(s.connects, 1u);  // the second call reused the pooled connection
  EXPECT_EQ(s.connections_open, 1u);
  EXPECT_EQ(s.connections_idle, 1u);
}

TEST_F(RedisStoreTest, EmptyBatchTouchesNothing) {
  RedisStore store("redis://127.0.0.1:" + std::to_string(closed_port()));
  Values out = {std::string("x")};
  store.mget(std::span<const std::string>(), out, in_ms(100));
  EXPECT_TRUE(out.empty());
  EXPECT_EQ(store.stats().connections_open, 0u);
}

TEST_F(RedisStoreTest, LargeBatchIsPipelinedInChunks) {
  constexpr int kKeys = 5'000;
  // Every third key is absent; one value is 1 MiB, so its reply spans many reads.
  std::vector<std::string> keys;
  std::vector<std::optional<std::string>> expected;
  std::vector<std::string> mset = {"MSET"};
  const std::string big(1 << 20, 'B');
  for (int i = 0; i < kKeys; ++i) {
    keys.push_back(key("k" + std::to_string(i)));
    if (i % 3 == 2) {
      expected.emplace_back(std::nullopt);
      continue;
    }
    std::string v = i == 1234 ? big : "value-" + std::to_string(i) + std::string(i % 50, 'x');
    mset.push_back(keys.back());
    mset.push_back(v);
    expected.emplace_back(std::move(v));
  }
  ReplyPtr r = raw_->command(mset);
  ASSERT_TRUE(r && r->type == REDIS_REPLY_STATUS);

  RedisStore store(kRedisUrl);  // 1000 keys per MGET: 5 commands
  Values out;
  store.mget(keys, out, in_ms(5000));
  ASSERT_EQ(out.size(), expected.size());
  for (int i = 0; i < kKeys; ++i) ASSERT_EQ(out[i], expected[i]) << "key " << i;

  // Uneven chunks (7 keys per MGET, the last one short), on the same connection after.
  RedisStoreOptions small;
  small.max_keys_per_command = 7;
  RedisStore chunked(kRedisUrl, "", small);
  const std::vector<std::string> some(keys.begin() + 100, keys.begin() + 150);
  chunked.mget(some, out, in_ms(1000));
  ASSERT_EQ(out.size(), 50u);
  for (int i = 0; i < 50; ++i) EXPECT_EQ(out[i], expected[100 + i]) << "key " << 100 + i;
  chunked.mget(some, out, in_ms(1000));
  EXPECT_EQ(out[49], expected[149]);
  EXPECT_EQ(chunked.stats().connects, 1u);
}

TEST_F(RedisStoreTest, KeyPrefixIsPrepended) {
  raw_->set(key("ns:user:1"), "prefixed");
  raw_->set(key("user:1"), "bare");
  RedisStore store(kRedisUrl, key("ns:"));
  EXPECT_EQ(store.key_prefix(), key("ns:"));
  Values out;
  store.mget(std::vector<std::string>{"user:1", "user:2", std::string("user:\0", 6)}, out,
             in_ms(1000));
  EXPECT_EQ(out, (Values{"prefixed", std::nullopt, std::nullopt}));
  RedisStore bare(kRedisUrl, prefix_);
  bare.mget(std::vector<std::string>{"user:1"}, out, in_ms(1000));
  EXPECT_EQ(out, (Values{"bare"}));

  // The Python online store's ?namespace=ns means the prefix "ns:"; an explicit prefix wins.
  const std::string ns = prefix_ + "ns";  // ':' is fine in a query value
  RedisStore from_url(kRedisUrl + "/0?namespace=" + ns);
  EXPECT_EQ(from_url.key_prefix(), ns + ":");
  from_url.mget(std::vector<std::string>{"user:1"}, out, in_ms(1000));
  EXPECT_EQ(out, (Values{"prefixed"}));
  RedisStore explicit_wins(kRedisUrl + "/0?namespace=" + ns, prefix_);
  explicit_wins.mget(std::vector<std::string>{"user:1"}, out, in_ms(1000));
  EXPECT_EQ(out, (Values{"bare"}));
}

TEST_F(RedisStoreTest, SelectsTheDatabaseFromTheUrl) {
  dbs_used_.push_back(3);
  raw_->select(3);
  raw_->set(key("k"), "in db 3");
  raw_->select(0);
  Values out;
  RedisStore db3(kRedisUrl + "/3");
  db3.mget(std::vector<std::string>{key("k")}, out, in_ms(1000));
  EXPECT_EQ(out, (Values{"in db 3"}));
  RedisStore db0(kRedisUrl);
  db0.mget(std::vector<std::string>{key("k")}, out, in_ms(1000));
  EXPECT_EQ(out, (Values{std::nullopt}));
}

TEST_F(RedisStoreTest, UnixSocket) {
  dbs_used_.push_back(3);
  raw_->select(3);
  raw_->set(key("k"), "over a unix socket");
  raw_->select(0);
  const std::string path = "/tmp/carrara-redis-test-" + std::to_string(getpid()) + ".sock";
  FakeRedis fake({Mode::kForward}, {}, "", path);
  RedisStore store("unix://" + path + "?db=3");
  Values out;
  store.mget(std::vector<std::string>{key("k"), key("nope")}, out, in_ms(1000));
  EXPECT_EQ(out, (Values{"over a unix socket", std::nullopt}));
  EXPECT_EQ(fake.accepted(1), 1);

  RedisStore missing("unix:///tmp/carrara-no-such-socket.sock");
  expect_error([&] { missing.mget(std::vector<std::string>{"k"}, out, in_ms(1000)); },
               ErrorCode::kUnavailable, {"unix:///tmp/carrara-no-such-socket.sock", "connect"});
}

TEST_F(RedisStoreTest, WrongPasswordIsUnavailableAndNotEchoed) {
  RedisStore store("redis://:hunter2-wrong@127.0.0.1:6379");
  Values out;
  const std::string msg =
      expect_error([&] { store.mget(std::vector<std::string>{key("k")}, out, in_ms(1000)); },
                   ErrorCode::kUnavailable, {"AUTH failed", "redis://:***@127.0.0.1:6379"});
  EXPECT_EQ(msg.find("hunter2"), std::string::npos) << msg;
  EXPECT_EQ(store.stats().connections_open, 0u);
}

TEST_F(RedisStoreTest, ConcurrentCallsFrom8Threads) {
  constexpr int kThreads = 8;
  constexpr int kCalls = 200;
  constexpr int kKeySpace = 200;
  std::vector<std::string> mset = {"MSET"};
  for (int i = 0; i < kKeySpace; i += 2) {  // odd keys absent
    mset.push_back(key(std::to_string(i)));
    mset.push_back("v" + std::to_string(i));
  }
  ASSERT_TRUE(raw_->command(mset));

  RedisStoreOptions options;
  options.max_keys_per_command = 16;  // several commands per call, interleaved across threads
  RedisStore store(kRedisUrl, prefix_, options);
  std::atomic<int> wrong{0};
  std::atomic<int> errors{0};
  std::latch start(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(static_cast<unsigned>(t));
      std::uniform_int_distribution<int> pick(0, kKeySpace - 1);
      std::uniform_int_distribution<int> size(1, 60);
      start.arrive_and_wait();
      Values out;
      for (int c = 0; c < kCalls; ++c) {
        std::vector<std::string> keys;
        for (int n = size(rng); n > 0; --n) keys.push_back(std::to_string(pick(rng)));
        try {
          store.mget(keys, out, in_ms(2000));
        } catch (const Error&) {
          errors.fetch_add(1);
          continue;
        }
        for (std::size_t i = 0; i < keys.size(); ++i) {
          const int k = std::stoi(keys[i]);
          const std::optional<std::string> want =
              k % 2 == 0 ? std::optional<std::string>("v" + keys[i]) : std::nullopt;
          if (out.size() != keys.size() || out[i] != want) wrong.fetch_add(1);
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(wrong.load(), 0);
  const RedisStoreStats s = store.stats();
  EXPECT_EQ(s.calls, static_cast<std::uint64_t>(kThreads * kCalls));
  EXPECT_EQ(s.failures, 0u);
  EXPECT_LE(s.connects, static_cast<std::uint64_t>(kThreads));  // one per concurrent caller at most
  EXPECT_EQ(s.connections_open, s.connections_idle);
}

TEST_F(RedisStoreTest, PoolKeepsAtMostMaxIdleConnections) {
  RedisStoreOptions options;
  options.max_idle_connections = 2;
  RedisStore store(kRedisUrl, prefix_, options);
  std::latch start(8);
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      start.arrive_and_wait();
      Values out;
      for (int c = 0; c < 50; ++c) store.mget(std::vector<std::string>{"a", "b"}, out, in_ms(2000));
    });
  }
  for (std::thread& t : threads) t.join();
  const RedisStoreStats s = store.stats();
  EXPECT_LE(s.connections_open, 2u);
  EXPECT_EQ(s.connections_open, s.connections_idle);
  EXPECT_EQ(s.failures, 0u);

  RedisStoreOptions none;
  none.max_idle_connections = 0;  // no pooling: every call connects
  RedisStore unpooled(kRedisUrl, prefix_, none);
  Values out;
  unpooled.mget(std::vector<std::string>{"a"}, out, in_ms(1000));
  unpooled.mget(std::vector<std::string>{"a"}, out, in_ms(1000));
  EXPECT_EQ(unpooled.stats().connects, 2u);
  EXPECT_EQ(unpooled.stats().connections_open, 0u);
}

TEST_F(RedisStoreTest, PassedDeadlineIsDeadlineExceededWithoutIo) {
  raw_->set(key("k"), "v");
  RedisStore store(kRedisUrl);
  Values out;
  expect_error([&] { store.mget(std::vector<std::string>{key("k")}, out, in_ms(-1)); },
               ErrorCode::kDeadlineExceeded, {"deadline passed before the request was sent"});
  RedisStoreStats s = store.stats();
  EXPECT_EQ(s.connects, 0u);
  EXPECT_EQ(s.timeouts, 1u);
  EXPECT_EQ(s.failures, 1u);
  // The caller's late deadline says nothing about Redis: the store is not marked down.
  store.mget(std::vector<std::string>{key("k")}, out, in_ms(1000));
  EXPECT_EQ(out, (Values{"v"}));
}

TEST_F(RedisStoreTest, PingAndTheDefaultDeadline) {
  raw_->set(key("k"), "v");
  RedisStoreOptions options;
  options.default_timeout_ns = 1'000'000'000;
  RedisStore store(kRedisUrl, prefix_, options);
  store.ping(in_ms(1000));
  Values out;
  store.mget(std::vector<std::string>{"k"}, out);
  EXPECT_EQ(out, (Values{"v"}));
  // Through the interface, as the serving engine holds it.
  FeatureStore& fs = store;
  fs.mget(std::vector<std::string>{"k", "x"}, out, in_ms(1000));
  EXPECT_EQ(out, (Values{"v", std::nullopt}));
  EXPECT_EQ(store.stats().calls, 3u);
  EXPECT_EQ(store.stats().connects, 1u);
}

TEST_F(RedisStoreTest, ServerClosedIdleConnectionIsReplacedTransparently) {
  raw_->set(key("k"), "v");
  RedisStoreOptions options;
  options.client_name = "carrara-test-" + std::to_string(getpid()) + "-stale";
  RedisStore store(kRedisUrl, prefix_, options);
  Values out;
  store.mget(std::vector<std::string>{"k"}, out, in_ms(1000));
  ASSERT_EQ(store.stats().connections_idle, 1u);

  // The server drops the pooled connection (as on a restart or its idle `timeout`).
  ReplyPtr list = raw_->command({"CLIENT", "LIST"});
  ASSERT_TRUE(list && list->type == REDIS_REPLY_STRING);
  const std::string clients(list->str, list->len);
  const std::size_t at = clients.find("name=" + options.client_name + " ");
  ASSERT_NE(at, std::string::npos) << clients;
  const std::size_t newline = clients.rfind('\n', at);
  const std::size_t line = newline == std::string::npos ? 0 : newline + 1;  // "id=N addr=..."
  const std::string id = clients.substr(line + 3, clients.find(' ', line) - line - 3);
  ReplyPtr killed = raw_->command({"CLIENT", "KILL", "ID", id});
  ASSERT_TRUE(killed && killed->type == REDIS_REPLY_INTEGER && killed->integer == 1) << id;

  store.mget(std::vector<std::string>{"k"}, out, in_ms(1000));
  EXPECT_EQ(out, (Values{"v"}));
  const RedisStoreStats s = store.stats();
  EXPECT_EQ(s.failures, 0u);
  EXPECT_EQ(s.stale_retries, 1u);
  EXPECT_EQ(s.connects, 2u);
  EXPECT_EQ(s.connections_open, 1u);
}

// A 20 ms deadline against a Redis that stalls; the call after the down window gets a fresh
// connection (forwarded to the real Redis) and works.
TEST_F(RedisStoreTest, DownBackoffFailsFastThenReconnects) {
  raw_->set(key("k"), "v");
  FakeRedis fake({Mode::kStall, Mode::kForward});
  RedisStoreOptions options;
  options.down_backoff_ns = 500'000'000;  // long enough for a loaded CI machine
  RedisStore store(fake.url(), prefix_, options);
  const std::vector<std::string> keys = {"k"};
  Values out;

  std::int64_t t0 = now();
  expect_error([&] { store.mget(keys, out, in_ms(20)); }, ErrorCode::kDeadlineExceeded,
               {"deadline exceeded", "budget"});
  EXPECT_GE(elapsed_ms(t0), 15.0);  // the socket timeout may end up to one tick (4 ms) early

  // Inside the window: at once, and without touching the network.
  t0 = now();
  const std::string msg =
      expect_error([&] { store.mget(keys, out, in_ms(1000)); }, ErrorCode::kUnavailable,
                   {"marked down for another", "after a failure (deadline exceeded"});
  EXPECT_LT(elapsed_ms(t0), 200.0) << msg;  // touching the stalled server would take 1 s
  EXPECT_EQ(fake.accepted(1), 1);
  EXPECT_EQ(fake.closed(1), 1) << "the timed-out connection must be closed";

  std::this_thread::sleep_for(milliseconds(510));
  store.mget(keys, out, in_ms(1000));  // the probe: a new connection
  EXPECT_EQ(out, (Values{"v"}));
  EXPECT_EQ(fake.accepted(2), 2);
  store.mget(keys, out, in_ms(1000));  // up again: pooled
  EXPECT_EQ(fake.accepted(2), 2);

  const RedisStoreStats s = store.stats();
  EXPECT_EQ(s.calls, 4u);
  EXPECT_EQ(s.failures, 2u);
  EXPECT_EQ(s.timeouts, 1u);
  EXPECT_EQ(s.fast_failures, 1u);
  EXPECT_EQ(s.connects, 2u);
  EXPECT_EQ(s.connections_open, 1u);
}

// The reply to a timed-out call arrives late; had the connection been pooled, the next call
// would read it as its own answer.
TEST_F(RedisStoreTest, LateReplyNeverReachesALaterCall) {
  raw_->set(key("a"), "value of a");
  raw_->set(key("b"), "value of b");
  FakeRedis fake({Mode::kDelay, Mode::kForward}, milliseconds(100));
  RedisStoreOptions options;
  options.down_backoff_ns = 0;  // no window: the next call goes straight out
  RedisStore store(fake.url(), prefix_, options);
  Values out;
  expect_error([&] { store.mget(std::vector<std::string>{"a"}, out, in_ms(30)); },
               ErrorCode::kDeadlineExceeded);
  std::this_thread::sleep_for(milliseconds(150));  // the late reply has been sent by now
  store.mget(std::vector<std::string>{"b"}, out, in_ms(1000));
  EXPECT_EQ(out, (Values{"value of b"}));
  EXPECT_EQ(fake.accepted(2), 2);
}

// ---- failures that need no Redis -------------------------------------------------------------

TEST(RedisStoreFailure, UnreachablePortIsUnavailableFast) {
  const std::string url = "redis://127.0.0.1:" + std::to_string(closed_port());
  RedisStore store(url);
  Values out;
  const std::int64_t t0 = now();
  expect_error([&] { store.mget(std::vector<std::string>{"k"}, out, in_ms(2000)); },
               ErrorCode::kUnavailable, {url, "cannot connect", "refused"});
  EXPECT_LT(elapsed_ms(t0), 100.0);
  EXPECT_EQ(store.stats().connections_open, 0u);
  expect_error([&] { store.ping(in_ms(2000)); }, ErrorCode::kUnavailable, {"marked down"});
}

TEST(RedisStoreFailure, DownWindowSkipsTheNetworkThenProbes) {
  FakeRedis fake({Mode::kStall});
  RedisStoreOptions options;
  options.down_backoff_ns = 500'000'000;  // long enough for a loaded CI machine
  RedisStore store(fake.url(), "", options);
  const std::vector<std::string> keys = {"k"};
  Values out;
  expect_error([&] { store.mget(keys, out, in_ms(20)); }, ErrorCode::kDeadlineExceeded);
  for (int i = 0; i < 100; ++i) {
    // Microseconds; touching the stalled server would take the whole second.
    const std::int64_t t0 = now();
    expect_error([&] { store.mget(keys, out, in_ms(1000)); }, ErrorCode::kUnavailable,
                 {"marked down"});
    EXPECT_LT(elapsed_ms(t0), 200.0);
  }
  EXPECT_EQ(fake.accepted(1), 1);
  EXPECT_EQ(store.stats().fast_failures, 100u);

  // After the window exactly one call probes; the ones that arrive meanwhile fail fast.
  std::this_thread::sleep_for(milliseconds(510));
  constexpr int kThreads = 8;
  std::atomic<int> timeouts{0};
  std::atomic<int> fast{0};
  std::latch start(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      Values mine;
      start.arrive_and_wait();
      try {
        store.mget(keys, mine, in_ms(60));
      } catch (const Error& e) {
        (e.code() == ErrorCode::kDeadlineExceeded ? timeouts : fast).fetch_add(1);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(timeouts.load(), 1);
  EXPECT_EQ(fast.load(), kThreads - 1);
  EXPECT_EQ(fake.accepted(2), 2);
  EXPECT_EQ(store.stats().connections_open, 0u);
}

TEST(RedisStoreFailure, HungServerTimesOutAndTheConnectionIsDropped) {
  FakeRedis fake({Mode::kStall});
  RedisStoreOptions options;
  options.down_backoff_ns = 50'000'000;
  RedisStore store(fake.url(), "", options);
  Values out;
  for (int round = 1; round <= 2; ++round) {
    const std::int64_t t0 = now();
    expect_error([&] { store.mget(std::vector<std::string>{"k"}, out, in_ms(20)); },
                 ErrorCode::kDeadlineExceeded, {"deadline exceeded", "budget"});
    // 20 ms, give or take one timer tick (1-4 ms) and scheduling; a store that waited for its
    // connect timeout (200 ms) or without a timeout would be far past the bound.
    const double took = elapsed_ms(t0);
    EXPECT_GE(took, 15.0);
    EXPECT_LE(took, 80.0);
    // Closed, not pooled: the next probe opens a new connection.
    EXPECT_EQ(store.stats().connections_open, 0u);
    EXPECT_EQ(fake.closed(round), round);
    EXPECT_EQ(fake.accepted(round), round);
    std::this_thread::sleep_for(milliseconds(60));
  }
  EXPECT_EQ(store.stats().timeouts, 2u);
}

// hiredis writes with write(2): a big request to a server that went away ends in EPIPE, whose
// SIGPIPE would kill this process (gtest does not ignore it) if the store did not block it.
TEST(RedisStoreFailure, ServerGoneMidWriteRaisesNoSigpipe) {
  FakeRedis fake({Mode::kClose});
  RedisStore store(fake.url());
  std::vector<std::string> keys;
  for (int i = 0; i < 4'000; ++i) keys.push_back(std::to_string(i) + std::string(2'000, 'k'));
  Values out;
  expect_error([&] { store.mget(keys, out, in_ms(2000)); }, ErrorCode::kUnavailable,
               {"connection failed"});
  EXPECT_EQ(store.stats().connections_open, 0u);
}

TEST(RedisStoreFailure, MalformedRepliesAreUnavailable) {
  struct Case {
    const char* canned;
    const char* expect;
  };
  const Case cases[] = {
      {":1\r\n", "a reply of type integer"},
      {"-ERR something broke\r\n", "MGET failed: ERR something broke"},
      {"*1\r\n:5\r\n", "element of type integer"},
      {"*2\r\n$1\r\na\r\n$1\r\nb\r\n", "an array of 2"},
      {"!!garbage\r\n", "unparsable reply"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.canned);
    FakeRedis fake({Mode::kCanned}, {}, c.canned);
    RedisStore store(fake.url());
    Values out;
    expect_error([&] { store.mget(std::vector<std::string>{"k"}, out, in_ms(1000)); },
                 ErrorCode::kUnavailable, {c.expect});
    EXPECT_EQ(store.stats().connections_open, 0u);
  }
}

}  // namespace
}  // namespace carrara::core
