#include "carrara/core/redis_store.hpp"

#include <hiredis/hiredis.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/time.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <limits>
#include <optional>
#include <stdexcept>
#include <utility>

#include "carrara/core/error.hpp"

namespace carrara::core {

namespace {

constexpr std::size_t kMaxKeysPerCommand = 1'000'000;

// A failed exchange on one connection. RedisStore::call closes the connection and turns this
// into an Error; it never leaves this file.
class IoFailure : public std::runtime_error {
 public:
  IoFailure(std::string message, bool timeout, bool closed = false)
      : std::runtime_error(std::move(message)), timed_out(timeout), closed_by_server(closed) {}
  bool timed_out;         // the deadline ran out
  bool closed_by_server;  // EOF/reset: a pooled connection the server had closed
};

std::string ms(std::int64_t ns) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f ms", static_cast<double>(ns) / 1e6);
  return buf;
}

// Rounded up to whole microseconds, and at least one: a zero timeval means "no timeout".
timeval to_timeval(std::int64_t ns) {
  const std::int64_t us = std::max<std::int64_t>(1, ns / 1'000 + (ns % 1'000 > 0 ? 1 : 0));
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(us / 1'000'000);
  tv.tv_usec = static_cast<suseconds_t>(us % 1'000'000);
  return tv;
}

// Sets the socket's send or receive timeout to the time left before the deadline. Done before
// every read and write (not once per call), so a server that trickles bytes cannot stretch a
// call past its deadline.
void arm(redisContext* c, int option, std::int64_t deadline_ns, const char* doing) {
  const std::int64_t left = deadline_ns - RedisStore::now_ns();
  if (left <= 0) throw IoFailure(std::string("deadline exceeded ") + doing, true);
  const timeval tv = to_timeval(left);
  if (setsockopt(c->fd, SOL_SOCKET, option, &tv, sizeof tv) != 0) {
    throw IoFailure(std::string("cannot set the socket timeout: ") + std::strerror(errno), false);
  }
}

IoFailure io_failure(const redisContext* c, int saved_errno, std::int64_t deadline_ns,
                     const char* doing) {
  // In blocking mode hiredis reports a socket timeout as an I/O error with EAGAIN.
  const bool timeout =
      c->err == REDIS_ERR_IO && (saved_errno == EAGAIN || saved_errno == EWOULDBLOCK);
  if (timeout || RedisStore::now_ns() >= deadline_ns) {
    return IoFailure(std::string("deadline exceeded ") + doing, true);
  }
  const bool reset = saved_errno == ECONNRESET || saved_errno == EPIPE;
  const bool closed = c->err == REDIS_ERR_EOF || (c->err == REDIS_ERR_IO && reset);
  return IoFailure(std::string("connection failed ") + doing + ": " + c->errstr, false, closed);
}

// Blocks SIGPIPE in this thread around a socket write. hiredis writes with write(2), and a write
// to a connection the server closed raises SIGPIPE, which kills a host process that does not
// ignore it (a C++ server; CPython does ignore it). libpq's technique: block it, write, and on
// failure consume the SIGPIPE the write queued before the old mask comes back.
class SigpipeBlock {
 public:
  SigpipeBlock() noexcept {
    sigset_t pipe = sigpipe_set();
    pthread_sigmask(SIG_BLOCK, &pipe, &old_);
  }
  ~SigpipeBlock() { pthread_sigmask(SIG_SETMASK, &old_, nullptr); }
  SigpipeBlock(const SigpipeBlock&) = delete;
  SigpipeBlock& operator=(const SigpipeBlock&) = delete;

  // After a failed write. When SIGPIPE was blocked already, a pending one may be the caller's:
  // leave it.
  void discard_own_sigpipe() noexcept {
    if (sigismember(&old_, SIGPIPE) == 1) return;
    sigset_t pending;
    sigemptyset(&pending);
    if (sigpending(&pending) != 0 || sigismember(&pending, SIGPIPE) != 1) return;
    sigset_t pipe = sigpipe_set();
    const timespec zero{0, 0};
    while (sigtimedwait(&pipe, nullptr, &zero) == -1 && errno == EINTR) {
    }
  }

 private:
  static sigset_t sigpipe_set() noexcept {
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGPIPE);
    return s;
  }
  sigset_t old_;
};

// Whether SIGPIPE is ignored process-wide (then writes need no SigpipeBlock: two syscalls
// fewer per call).
bool sigpipe_ignored() noexcept {
  struct sigaction sa {};
  return sigaction(SIGPIPE, nullptr, &sa) == 0 && !(sa.sa_flags & SA_SIGINFO) &&
         sa.sa_handler == SIG_IGN;
}

// Sends every command appended to the context.
void write_all(redisContext* c, std::int64_t deadline_ns, bool guard_sigpipe) {
  int done = 0;
  while (done == 0) {
    arm(c, SO_SNDTIMEO, deadline_ns, "sending the request");
    std::optional<SigpipeBlock> block;
    if (guard_sigpipe) block.emplace();
    if (redisBufferWrite(c, &done) != REDIS_OK) {
      const int saved_errno = errno;
      if (block) block->discard_own_sigpipe();
      throw io_failure(c, saved_errno, deadline_ns, "sending the request");
    }
  }
}

struct ReplyFree {
  void operator()(redisReply* r) const noexcept { freeReplyObject(r); }
};
using ReplyPtr = std::unique_ptr<redisReply, ReplyFree>;

// The next reply: what is buffered, else reads (hiredis' redisGetReply, with the socket
// timeout re-armed before each read and EINTR retried).
ReplyPtr read_reply(redisContext* c, std::int64_t deadline_ns) {
  for (;;) {
    void* reply = nullptr;
    if (redisGetReplyFromReader(c, &reply) != REDIS_OK) {
      throw IoFailure(std::string("unparsable reply: ") + c->errstr, false);
    }
    if (reply != nullptr) return ReplyPtr(static_cast<redisReply*>(reply));
    arm(c, SO_RCVTIMEO, deadline_ns, "waiting for the reply");
    if (redisBufferRead(c) != REDIS_OK) {
      throw io_failure(c, errno, deadline_ns, "waiting for the reply");
    }
  }
}

void append(redisContext* c, int argc, const char** argv, const std::size_t* argvlen) {
  if (redisAppendCommandArgv(c, argc, argv, argvlen) != REDIS_OK) {
    throw IoFailure(std::string("cannot format the command: ") + c->errstr, false);
  }
}

const char* reply_type_name(int type) {
  switch (type) {
    case REDIS_REPLY_STRING: return "string";
    case REDIS_REPLY_ARRAY: return "array";
    case REDIS_REPLY_INTEGER: return "integer";
    case REDIS_REPLY_NIL: return "nil";
    case REDIS_REPLY_STATUS: return "status";
    case REDIS_REPLY_ERROR: return "error";
  }
  return "unknown";
}

// Throws when `r` is an error reply; `what` names the command.
void check_not_error(const redisReply& r, const char* what) {
  if (r.type == REDIS_REPLY_ERROR) {
    throw IoFailure(std::string(what) + " failed: " + std::string(r.str, r.len), false);
  }
}

// ---- URL parsing ------------------------------------------------------------------------------

constexpr const char* kUrlForms =
    "expected redis://[[user]:password@]host[:port][/db] or unix:///path/to/sock[?db=N]";

// The URL with its password replaced by "***": URLs end up in error messages.
std::string mask_password(std::string_view url) {
  const std::size_t scheme_end = url.find("://");
  if (scheme_end == std::string_view::npos) return std::string(url);
  const std::size_t start = scheme_end + 3;
  const std::size_t slash = url.find('/', start);
  const std::size_t at = url.substr(0, slash).rfind('@');
  if (at == std::string_view::npos || at < start) return std::string(url);
  const std::size_t colon = url.substr(0, at).find(':', start);
  if (colon == std::string_view::npos) return std::string(url);
  return std::string(url.substr(0, colon + 1)) + "***" + std::string(url.substr(at));
}

int hex_digit(char ch) {
  if (ch >= '0' && ch <= '9') return ch - '0';
  if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
  if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
  return -1;
}

struct UrlParser {
  std::string_view url;

  Error bad(const std::string& why) const {
    return Error(ErrorCode::kInvalidArgument, "redis URL '" + mask_password(url) + "': " + why);
  }

  // Percent-decoding; in a query value '+' is a space too (as Python's parse_qs reads it).
  std::string decode(std::string_view s, const char* what, bool query = false) const {
    std::string out;
    out.reserve(s.size());
    for (std::size_t i = 0; i < s.size(); ++i) {
      if (query && s[i] == '+') {
        out.push_back(' ');
        continue;
      }
      if (s[i] != '%') {
        out.push_back(s[i]);
        continue;
      }
      const int hi = i + 2 < s.size() ? hex_digit(s[i + 1]) : -1;
      const int lo = i + 2 < s.size() ? hex_digit(s[i + 2]) : -1;
      if (hi < 0 || lo < 0) {
        throw bad(std::string("bad percent-encoding in the ") + what);
      }
      out.push_back(static_cast<char>(hi * 16 + lo));
      i += 2;
    }
    return out;
  }

  int number(std::string_view s, int lo, int hi, const char* what) const {
    int v = 0;
    const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (s.empty() || ec != std::errc() || end != s.data() + s.size() || v < lo || v > hi) {
      throw bad(std::string(what) + " '" + std::string(s) + "' must be an integer in [" +
                std::to_string(lo) + ", " + std::to_string(hi) + "]");
    }
    return v;
  }

  RedisEndpoint parse() const {
    const std::size_t scheme_end = url.find("://");
    if (scheme_end == std::string_view::npos) throw bad(kUrlForms);
    const std::string_view scheme = url.substr(0, scheme_end);
    if (scheme == "rediss") {
      throw bad("TLS (rediss://) is not supported by the native Redis client; use redis:// or "
                "unix://");
    }
    if (scheme != "redis" && scheme != "unix") {
      throw bad("unknown scheme '" + std::string(scheme) + "'; " + kUrlForms);
    }
    std::string_view rest = url.substr(scheme_end + 3);
    std::string_view query;
    if (const std::size_t q = rest.find('?'); q != std::string_view::npos) {
      query = rest.substr(q + 1);
      rest = rest.substr(0, q);
    }
    RedisEndpoint ep;
    if (const std::size_t at = rest.substr(0, rest.find('/')).rfind('@');
        at != std::string_view::npos) {
      const std::string_view userinfo = rest.substr(0, at);
      rest = rest.substr(at + 1);
      const std::size_t colon = userinfo.find(':');
      if (colon == std::string_view::npos) {
        throw bad("credentials must be ':password' or 'user:password'");
      }
      ep.user = decode(userinfo.substr(0, colon), "user");
      ep.password = decode(userinfo.substr(colon + 1), "password");
      if (!ep.user.empty() && ep.password.empty()) {
        throw bad("user '" + ep.user + "' has no password");
      }
    }
    std::optional<int> db;
    if (scheme == "unix") {
      if (rest.empty() || rest.front() != '/') {
        throw bad("a unix URL needs an absolute socket path: unix:///path/to/redis.sock");
      }
      ep.unix_path = decode(rest, "socket path");
    } else {
      const std::size_t slash = rest.find('/');
      const std::string_view authority = rest.substr(0, slash);
      const std::string_view path =
          slash == std::string_view::npos ? std::string_view() : rest.substr(slash + 1);
      std::string_view port;
      if (!authority.empty() && authority.front() == '[') {
        const std::size_t close = authority.find(']');
        if (close == std::string_view::npos) throw bad("unclosed '[' in the host");
        ep.host = std::string(authority.substr(1, close - 1));
        const std::string_view after = authority.substr(close + 1);
        if (!after.empty() && after.front() != ':') throw bad("unexpected text after ']'");
        if (!after.empty()) port = after.substr(1);
        if (!after.empty() && port.empty()) throw bad("empty port");
      } else {
        const std::size_t colon = authority.find(':');
        ep.host = std::string(authority.substr(0, colon));
        if (colon != std::string_view::npos) {
          port = authority.substr(colon + 1);
          if (port.empty()) throw bad("empty port");
        }
      }
      if (ep.host.empty()) ep.host = "localhost";
      if (!port.empty()) ep.port = number(port, 1, 65535, "port");
      if (!path.empty()) db = number(path, 0, std::numeric_limits<int>::max(), "database");
    }
    while (!query.empty()) {
      const std::size_t amp = query.find('&');
      const std::string_view param = query.substr(0, amp);
      query = amp == std::string_view::npos ? std::string_view() : query.substr(amp + 1);
      const std::size_t eq = param.find('=');
      const std::string_view name = param.substr(0, eq);
      const std::string_view value =
          eq == std::string_view::npos ? std::string_view() : param.substr(eq + 1);
      if (name == "db") {
        if (db.has_value()) throw bad("the database is given twice");
        db = number(value, 0, std::numeric_limits<int>::max(), "database");
      } else if (name == "namespace") {
        ep.key_namespace = decode(value, "namespace", true);
      } else if (name == "cluster") {
        throw bad("Redis Cluster is not supported by the native Redis client");
      } else {
        throw bad("unknown parameter '" + std::string(name) + "' (known: db, namespace)");
      }
    }
    ep.db = db.value_or(0);
    return ep;
  }
};

}  // namespace

// ---- RedisEndpoint ----------------------------------------------------------------------------

std::string RedisEndpoint::describe() const {
  std::string creds;
  if (!password.empty()) creds = user + ":***@";
  std::string query;
  if (!unix_path.empty() && db != 0) query = "db=" + std::to_string(db);
  if (!key_namespace.empty()) query += (query.empty() ? "" : "&") + ("namespace=" + key_namespace);
  if (!query.empty()) query.insert(0, "?");
  if (!unix_path.empty()) return "unix://" + creds + unix_path + query;
  const std::string h = host.find(':') != std::string::npos ? "[" + host + "]" : host;
  return "redis://" + creds + h + ":" + std::to_string(port) + "/" + std::to_string(db) + query;
}

RedisEndpoint parse_redis_url(std::string_view url) { return UrlParser{url}.parse(); }

// ---- RedisStore -------------------------------------------------------------------------------

class RedisStore::Connection {
 public:
  Connection(redisContext* c, std::atomic<std::size_t>& open) noexcept : c_(c), open_(open) {
    open_.fetch_add(1, std::memory_order_relaxed);
  }
  ~Connection() {
    redisFree(c_);
    open_.fetch_sub(1, std::memory_order_relaxed);
  }
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  redisContext* get() const noexcept { return c_; }
  bool reused = false;  // has been in the pool: the server may have closed it since

 private:
  redisContext* c_;
  std::atomic<std::size_t>& open_;
};

RedisStore::RedisStore(std::string_view url, std::string key_prefix, RedisStoreOptions options)
    : endpoint_(parse_redis_url(url)),
      key_prefix_(key_prefix.empty() && !endpoint_.key_namespace.empty()
                      ? endpoint_.key_namespace + ":"
                      : std::move(key_prefix)),
      options_(std::move(options)),
      name_("redis " + endpoint_.describe()),
      guard_sigpipe_(!sigpipe_ignored()) {
  auto invalid = [](const std::string& why) {
    return Error(ErrorCode::kInvalidArgument, "RedisStore options: " + why);
  };
  if (options_.connect_timeout_ns <= 0) throw invalid("connect_timeout_ns must be > 0");
  if (options_.default_timeout_ns <= 0) throw invalid("default_timeout_ns must be > 0");
  if (options_.down_backoff_ns < 0) throw invalid("down_backoff_ns must be >= 0");
  if (options_.max_keys_per_command == 0 || options_.max_keys_per_command > kMaxKeysPerCommand) {
    throw invalid("max_keys_per_command must be in [1, " + std::to_string(kMaxKeysPerCommand) +
                  "], got " + std::to_string(options_.max_keys_per_command));
  }
  if (options_.client_name.find_first_of(" \r\n") != std::string::npos) {
    throw invalid("client_name '" + options_.client_name + "' must not contain spaces or newlines");
  }
}

RedisStore::~RedisStore() = default;

std::int64_t RedisStore::now_ns() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

RedisStoreStats RedisStore::stats() const {
  RedisStoreStats s;
  s.calls = calls_.load(std::memory_order_relaxed);
  s.failures = failures_.load(std::memory_order_relaxed);
  s.timeouts = timeouts_.load(std::memory_order_relaxed);
  s.fast_failures = fast_failures_.load(std::memory_order_relaxed);
  s.connects = connects_.load(std::memory_order_relaxed);
  s.stale_retries = stale_retries_.load(std::memory_order_relaxed);
  s.connections_open = connections_open_.load(std::memory_order_relaxed);
  std::lock_guard<std::mutex> lock(pool_mu_);
  s.connections_idle = idle_.size();
  return s;
}

void RedisStore::admit(std::int64_t now) {
  std::int64_t until = down_until_ns_.load(std::memory_order_acquire);
  while (until != 0) {
    if (now < until) {
      failures_.fetch_add(1, std::memory_order_relaxed);
      fast_failures_.fetch_add(1, std::memory_order_relaxed);
      std::string why;
      {
        std::lock_guard<std::mutex> lock(error_mu_);
        why = last_error_;
      }
      throw Error(ErrorCode::kUnavailable, name_ + " is marked down for another " +
                                               ms(until - now) + " after a failure (" + why + ")");
    }
    // The window is over: this call probes. Moving the window on keeps the concurrent callers
    // failing fast until the probe has its answer.
    if (down_until_ns_.compare_exchange_weak(until, now + options_.down_backoff_ns,
                                             std::memory_order_acq_rel)) {
      return;
    }
  }
}

void RedisStore::mark_down(const std::string& reason) {
  {
    std::lock_guard<std::mutex> lock(error_mu_);
    last_error_ = reason;
  }
  if (options_.down_backoff_ns > 0) {
    down_until_ns_.store(now_ns() + options_.down_backoff_ns, std::memory_order_release);
  }
  // The idle connections are as suspect as the one that failed (a restarted or hung server):
  // the next call connects afresh. Closed outside the lock.
  std::vector<ConnectionPtr> dropped;
  std::lock_guard<std::mutex> lock(pool_mu_);
  dropped.swap(idle_);
}

void RedisStore::mark_up() noexcept {
  if (down_until_ns_.load(std::memory_order_relaxed) != 0) {
    down_until_ns_.store(0, std::memory_order_release);
  }
}

RedisStore::ConnectionPtr RedisStore::borrow(std::int64_t deadline_ns) {
  {
    std::lock_guard<std::mutex> lock(pool_mu_);
    if (!idle_.empty()) {
      ConnectionPtr conn = std::move(idle_.back());
      idle_.pop_back();
      return conn;
    }
  }
  return connect(deadline_ns);
}

void RedisStore::release(ConnectionPtr conn) {
  conn->reused = true;
  ConnectionPtr surplus;  // destroyed (closed) after the lock is released
  std::lock_guard<std::mutex> lock(pool_mu_);
  if (idle_.size() < options_.max_idle_connections) {
    idle_.push_back(std::move(conn));
  } else {
    surplus = std::move(conn);
  }
}

RedisStore::ConnectionPtr RedisStore::connect(std::int64_t deadline_ns) {
  // Connecting and the setup commands share one budget: connect_timeout, capped by the deadline.
  const std::int64_t start = now_ns();
  const std::int64_t setup_deadline =
      start + std::min(options_.connect_timeout_ns, deadline_ns - start);
  if (setup_deadline <= start) throw IoFailure("deadline exceeded before connecting", true);
  const timeval tv = to_timeval(setup_deadline - start);
  redisContext* c = endpoint_.unix_path.empty()
                        ? redisConnectWithTimeout(endpoint_.host.c_str(), endpoint_.port, tv)
                        : redisConnectUnixWithTimeout(endpoint_.unix_path.c_str(), tv);
  if (c == nullptr) throw IoFailure("cannot allocate a connection", false);
  if (c->err != 0) {
    const std::string why = c->errstr;
    redisFree(c);
    if (now_ns() >= deadline_ns) {
      throw IoFailure("deadline exceeded connecting (" + why + ")", true);
    }
    throw IoFailure("cannot connect: " + why, false);
  }
  ConnectionPtr conn = std::make_unique<Connection>(c, connections_open_);
  try {
    setup(c, setup_deadline);
  } catch (const IoFailure& f) {
    // Out of connect_timeout but not of the caller's deadline: the server is slow, not the call.
    if (f.timed_out && now_ns() < deadline_ns) {
      throw IoFailure(std::string("connection setup timed out (connect_timeout ") +
                          ms(options_.connect_timeout_ns) + ")",
                      false);
    }
    throw;
  }
  connects_.fetch_add(1, std::memory_order_relaxed);
  return conn;
}

void RedisStore::setup(redisContext* c, std::int64_t deadline_ns) {
  // AUTH, SELECT and CLIENT SETNAME in one round trip.
  std::vector<const char*> what;
  if (!endpoint_.password.empty()) {
    if (endpoint_.user.empty()) {
      const char* argv[] = {"AUTH", endpoint_.password.c_str()};
      const std::size_t len[] = {4, endpoint_.password.size()};
      append(c, 2, argv, len);
    } else {
      const char* argv[] = {"AUTH", endpoint_.user.c_str(), endpoint_.password.c_str()};
      const std::size_t len[] = {4, endpoint_.user.size(), endpoint_.password.size()};
      append(c, 3, argv, len);
    }
    what.push_back("AUTH");
  }
  if (endpoint_.db != 0) {
    const std::string db = std::to_string(endpoint_.db);
    const char* argv[] = {"SELECT", db.c_str()};
    const std::size_t len[] = {6, db.size()};
    append(c, 2, argv, len);
    what.push_back("SELECT");
  }
  if (!options_.client_name.empty()) {
    const char* argv[] = {"CLIENT", "SETNAME", options_.client_name.c_str()};
    const std::size_t len[] = {6, 7, options_.client_name.size()};
    append(c, 3, argv, len);
    what.push_back("CLIENT SETNAME");
  }
  if (what.empty()) return;
  write_all(c, deadline_ns, guard_sigpipe_);
  for (const char* w : what) check_not_error(*read_reply(c, deadline_ns), w);
}

template <class Exchange>
void RedisStore::call(std::int64_t deadline_ns, Exchange&& exchange) {
  calls_.fetch_add(1, std::memory_order_relaxed);
  const std::int64_t start = now_ns();
  if (start >= deadline_ns) {
    // Not the server's fault: the store is not marked down.
    failures_.fetch_add(1, std::memory_order_relaxed);
    timeouts_.fetch_add(1, std::memory_order_relaxed);
    throw Error(ErrorCode::kDeadlineExceeded,
                name_ + ": the deadline passed before the request was sent (" +
                    ms(start - deadline_ns) + " ago)");
  }
  admit(start);
  for (bool retried = false;;) {
    ConnectionPtr conn;
    try {
      conn = borrow(deadline_ns);
      exchange(conn->get(), deadline_ns);
    } catch (const IoFailure& f) {
      const bool was_pooled = conn != nullptr && conn->reused;
      conn.reset();  // closed, never reused: its late replies would answer the next call
      if (f.closed_by_server && was_pooled && !retried && now_ns() < deadline_ns) {
        // The server closed it while it was idle (a restart, its `timeout`); the idle
        // connections are as old, so they go too. A read retries safely.
        stale_retries_.fetch_add(1, std::memory_order_relaxed);
        retried = true;
        std::vector<ConnectionPtr> dropped;
        std::lock_guard<std::mutex> lock(pool_mu_);
        dropped.swap(idle_);
        continue;
      }
      failures_.fetch_add(1, std::memory_order_relaxed);
      mark_down(f.what());
      if (f.timed_out) {
        timeouts_.fetch_add(1, std::memory_order_relaxed);
        throw Error(ErrorCode::kDeadlineExceeded, name_ + ": " + f.what() + " (budget " +
                                                      ms(deadline_ns - start) + ")");
      }
      throw Error(ErrorCode::kUnavailable, name_ + ": " + f.what());
    }
    release(std::move(conn));
    mark_up();
    return;
  }
}

void RedisStore::mget(std::span<const std::string> keys,
                      std::vector<std::optional<std::string>>& out, std::int64_t deadline_ns) {
  out.clear();
  if (keys.empty()) return;
  out.resize(keys.size());

  // The argument vectors of every command, built once (a retry sends them again): "MGET" and
  // up to max_keys_per_command keys each. Prefixed keys live in one arena sized up front, so
  // the pointers into it stay valid.
  const std::size_t n = keys.size();
  const std::size_t per = options_.max_keys_per_command;
  const std::size_t commands = (n + per - 1) / per;
  std::string arena;
  if (!key_prefix_.empty()) {
    std::size_t total = 0;
    for (const std::string& k : keys) total += key_prefix_.size() + k.size();
    arena.reserve(total);
  }
  std::vector<const char*> argv;
  std::vector<std::size_t> argl;
  argv.reserve(n + commands);
  argl.reserve(n + commands);
  for (std::size_t i = 0; i < n; ++i) {
    if (i % per == 0) {
      argv.push_back("MGET");
      argl.push_back(4);
    }
    if (key_prefix_.empty()) {
      argv.push_back(keys[i].data());
    } else {
      argv.push_back(arena.data() + arena.size());
      arena.append(key_prefix_).append(keys[i]);
    }
    argl.push_back(key_prefix_.size() + keys[i].size());
  }

  call(deadline_ns, [&](redisContext* c, std::int64_t deadline) {
    for (std::size_t k = 0, arg = 0; k < commands; ++k) {
      const std::size_t count = std::min(per, n - k * per);
      append(c, static_cast<int>(count + 1), argv.data() + arg, argl.data() + arg);
      arg += count + 1;
    }
    write_all(c, deadline, guard_sigpipe_);
    for (std::size_t k = 0; k < commands; ++k) {
      const ReplyPtr reply = read_reply(c, deadline);
      const std::size_t begin = k * per;
      const std::size_t count = std::min(per, n - begin);
      check_not_error(*reply, "MGET");
      if (reply->type != REDIS_REPLY_ARRAY || reply->elements != count) {
        throw IoFailure("MGET of " + std::to_string(count) + " keys answered with " +
                            (reply->type == REDIS_REPLY_ARRAY
                                 ? "an array of " + std::to_string(reply->elements)
                                 : std::string("a reply of type ") + reply_type_name(reply->type)),
                        false);
      }
      for (std::size_t j = 0; j < count; ++j) {
        const redisReply* e = reply->element[j];
        if (e->type == REDIS_REPLY_STRING) {
          out[begin + j].emplace(e->str, e->len);
        } else if (e->type == REDIS_REPLY_NIL) {
          out[begin + j].reset();
        } else {
          throw IoFailure(std::string("MGET answered with an element of type ") +
                              reply_type_name(e->type) + "; expected string or nil",
                          false);
        }
      }
    }
  });
}

void RedisStore::mget(std::span<const std::string> keys,
                      std::vector<std::optional<std::string>>& out) {
  mget(keys, out, now_ns() + options_.default_timeout_ns);
}

void RedisStore::ping(std::int64_t deadline_ns) {
  call(deadline_ns, [this](redisContext* c, std::int64_t deadline) {
    const char* argv[] = {"PING"};
    const std::size_t len[] = {4};
    append(c, 1, argv, len);
    write_all(c, deadline, guard_sigpipe_);
    const ReplyPtr reply = read_reply(c, deadline);
    check_not_error(*reply, "PING");
    if (reply->type != REDIS_REPLY_STATUS || std::string_view(reply->str, reply->len) != "PONG") {
      throw IoFailure(std::string("PING answered with a reply of type ") +
                          reply_type_name(reply->type),
                      false);
    }
  });
}

}  // namespace carrara::core
