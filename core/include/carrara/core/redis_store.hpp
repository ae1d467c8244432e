// RedisStore: the FeatureStore on Redis, for the serving hot path (hiredis, blocking sockets).
//
// A pool of connections, one pipelined MGET per call (split into commands of at most
// `max_keys_per_command` keys, all sent before any reply is read), and a hard deadline: the
// socket timeout is set to the time left before every read and write (the kernel's timer tick
// may end a wait up to one tick, 1-4 ms, early; never late). A connection that failed or timed
// out is closed, never reused (its late replies would answer the next call). After a failure
// (a timeout included; a deadline already past on entry excluded) the store is "down" for
// `down_backoff_ns`: calls then fail at once without touching the network, and the first call
// after the window probes again. A pooled connection the server had closed is replaced and the
// read retried once, transparently.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "carrara/core/feature_store.hpp"

struct redisContext;  // hiredis; only redis_store.cpp includes its headers

namespace carrara::core {

// Where and how to connect, as parsed from a URL:
//   redis://[[user]:password@]host[:port][/db][?namespace=ns]   (host may be [v6]; port 6379)
//   unix://[[user]:password@]/path/to/sock[?db=N][&namespace=ns]
// user and password may be percent-encoded. `namespace` is the Python online store's
// (feature_cache/online_store.py): keys are "{namespace}:{group}:{version}:{entity}", so the
// same URL configures both. TLS (rediss://) and Redis Cluster (?cluster=1) are not supported.
struct RedisEndpoint {
  std::string host;       // empty for a unix socket
  int port = 6379;
  std::string unix_path;  // set for unix://
  std::string user;       // empty: AUTH with the password only (the "default" user)
  std::string password;   // empty: no AUTH
  int db = 0;
  std::string key_namespace;  // ?namespace=; empty: none

  // The URL with the password masked, for messages and logs.
  std::string describe() const;
};

// Throws Error(kInvalidArgument) with the reason when `url` is not one of the forms above.
RedisEndpoint parse_redis_url(std::string_view url);

struct RedisStoreOptions {
  std::int64_t connect_timeout_ns = 200'000'000;  // connect + AUTH/SELECT, capped by the deadline
  std::int64_t default_timeout_ns = 50'000'000;   // mget() without a deadline: now + this
  std::size_t max_idle_connections = 16;          // pooled idle connections; more are closed
  std::int64_t down_backoff_ns = 250'000'000;     // fail fast for this long after a failure
  std::size_t max_keys_per_command = 1'000;       // bigger batches are several pipelined MGETs
  std::string client_name;                        // CLIENT SETNAME on connect when non-empty
};

struct RedisStoreStats {
  std::uint64_t calls = 0;           // mget() and ping() calls
  std::uint64_t failures = 0;        // calls that threw (timeouts and fast failures included)
  std::uint64_t timeouts = 0;        // ... of which with kDeadlineExceeded
  std::uint64_t fast_failures = 0;   // ... of which refused inside the down window, no I/O
  std::uint64_t connects = 0;        // connections opened (successfully) so far
  std::uint64_t stale_retries = 0;   // calls retried on a fresh connection after a pooled one
                                     // turned out closed by the server
  std::size_t connections_open = 0;  // open now, borrowed or idle
  std::size_t connections_idle = 0;  // idle in the pool now
};

class RedisStore final : public FeatureStore {
 public:
  // Connects lazily: the constructor only parses and validates (kInvalidArgument).
  // `key_prefix` is prepended to every key (e.g. "ns:"); when empty, the URL's ?namespace=ns
  // gives "ns:" (an explicit key_prefix wins, as the Python store's explicit namespace does).
  explicit RedisStore(std::string_view url, std::string key_prefix = {},
                      RedisStoreOptions options = {});
  ~RedisStore() override;

  RedisStore(const RedisStore&) = delete;
  RedisStore& operator=(const RedisStore&) = delete;

  // See FeatureStore::mget. On a throw the contents of `out` are unspecified.
  void mget(std::span<const std::string> keys, std::vector<std::optional<std::string>>& out,
            std::int64_t deadline_ns) override;
  // The same with the deadline now + options.default_timeout_ns.
  void mget(std::span<const std::string> keys, std::vector<std::optional<std::string>>& out);

  // One PING round trip (readiness checks); the same errors, down window and stats as mget.
  void ping(std::int64_t deadline_ns);

  RedisStoreStats stats() const;
  const RedisEndpoint& endpoint() const noexcept { return endpoint_; }
  const std::string& key_prefix() const noexcept { return key_prefix_; }
  const RedisStoreOptions& options() const noexcept { return options_; }

  // std::chrono::steady_clock::now() in ns: the clock of every deadline_ns.
  static std::int64_t now_ns() noexcept;

 private:
  class Connection;
  using ConnectionPtr = std::unique_ptr<Connection>;

  template <class Exchange>
  void call(std::int64_t deadline_ns, Exchange&& exchange);
  void admit(std::int64_t now);
  ConnectionPtr borrow(std::int64_t deadline_ns);
  ConnectionPtr connect(std::int64_t deadline_ns);
  void setup(redisContext* c, std::int64_t deadline_ns);
  void release(ConnectionPtr conn);
  void mark_down(const std::string& reason);
  void mark_up() noexcept;

  RedisEndpoint endpoint_;
  std::string key_prefix_;
  RedisStoreOptions options_;
  std::string name_;  // endpoint_.describe(), for messages
  // hiredis writes with write(2): unless SIGPIPE was ignored when the store was built (as in
  // CPython), each write blocks SIGPIPE in its thread so a closed socket cannot kill the host.
  bool guard_sigpipe_;

  mutable std::mutex pool_mu_;
  std::vector<ConnectionPtr> idle_;

  // 0 = up; otherwise calls before this steady time fail fast. A call after it claims the
  // probe by moving it forward (so concurrent callers keep failing fast while it runs).
  std::atomic<std::int64_t> down_until_ns_{0};
  mutable std::mutex error_mu_;
  std::string last_error_;  // why the store went down

  std::atomic<std::uint64_t> calls_{0};
  std::atomic<std::uint64_t> failures_{0};
  std::atomic<std::uint64_t> timeouts_{0};
  std::atomic<std::uint64_t> fast_failures_{0};
  std::atomic<std::uint64_t> connects_{0};
  std::atomic<std::uint64_t> stale_retries_{0};
  std::atomic<std::size_t> connections_open_{0};
};

}  // namespace carrara::core
