#include "carrara/core/engine.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <future>
#include <map>
#include <random>
#include <thread>
#include <unordered_map>

namespace carrara::core {

namespace {

std::string join(const std::vector<std::string>& names, const char* sep = ", ") {
  std::string out;
  for (const std::string& n : names) {
    if (!out.empty()) out += sep;
    out += n;
  }
  return out;
}

std::string seconds_text(std::int64_t ns) {
  std::string s = std::to_string(static_cast<double>(ns) / 1e9);
  while (s.size() > 1 && s.back() == '0') s.pop_back();
  if (!s.empty() && s.back() == '.') s += '0';
  return s + "s";
}

std::int64_t wall_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// Consecutive-failure circuit breaker: opens after `threshold` failures, lets one probe through
// after `reset_after`, closes on a success.
class Breaker {
 public:
  Breaker(std::uint32_t threshold, std::int64_t reset_after_ns)
      : threshold_(threshold), reset_after_ns_(reset_after_ns) {}

  bool allow() {
    std::lock_guard<std::mutex> lock(mu_);
    advance();
    if (state_ == kClosed) return true;
    if (state_ == kHalfOpen && !probe_in_flight_) {
      probe_in_flight_ = true;
      return true;
    }
    return false;
  }
  void success() {
    std::lock_guard<std::mutex> lock(mu_);
    failures_ = 0;
    state_ = kClosed;
    probe_in_flight_ = false;
  }
  void failure() {
    std::lock_guard<std::mutex> lock(mu_);
    ++failures_;
    if (state_ == kHalfOpen || failures_ >= threshold_) {
      state_ = kOpen;
      opened_at_ns_ = steady_now_ns();
      probe_in_flight_ = false;
    }
  }
  const char* state() {
    std::lock_guard<std::mutex> lock(mu_);
    advance();
    return state_ == kClosed ? "closed" : state_ == kOpen ? "open" : "half_open";
  }

 private:
  enum State { kClosed, kOpen, kHalfOpen };
  void advance() {
    if (state_ == kOpen && steady_now_ns() - opened_at_ns_ >= reset_after_ns_) {
      state_ = kHalfOpen;
      probe_in_flight_ = false;
    }
  }
  std::mutex mu_;
  std::uint32_t threshold_;
  std::int64_t reset_after_ns_;
  State state_ = kClosed;
  std::uint32_t failures_ = 0;
  std::int64_t opened_at_ns_ = 0;
  bool probe_in_flight_ = false;
};

struct VariantCounters {
  std::mutex mu;
  VariantMetrics m;
};

// Counters that outlive redeploys of one model.
struct ModelCounters {
  std::string name;
  std::atomic<std::size_t> in_flight{0};
  std::atomic<std::uint64_t> success_count{0};
  std::atomic<std::uint64_t> success_ns{0};
  std::atomic<std::uint64_t> fail_count{0};
  std::atomic<std::uint64_t> fail_ns{0};
  std::atomic<std::uint64_t> last_ms{0};
  std::atomic<std::uint64_t> entities{0};
  std::atomic<std::uint64_t> degraded{0};
  std::mutex mu;
  std::map<std::pair<std::string, std::uint32_t>, std::shared_ptr<VariantCounters>> variants;

  std::shared_ptr<VariantCounters> variant(const std::string& name, std::uint32_t version) {
    std::lock_guard<std::mutex> lock(mu);
    auto& slot = variants[{name, version}];
    if (!slot) {
      slot = std::make_shared<VariantCounters>();
      slot->m.model = this->name;
      slot->m.variant = name;
      slot->m.version = version;
    }
    return slot;
  }
};

struct LiveVariant {
  std::string name;
  std::uint32_t version = 0;
  std::int64_t timeout_ns = 0;
  Assembler assembler;
  std::shared_ptr<const std::vector<std::string>> columns;
  std::shared_ptr<Executor> executor;
  std::shared_ptr<Breaker> breaker;
  std::shared_ptr<VariantCounters> counters;

  LiveVariant(const VariantConfig& c)
      : name(c.name), version(c.version), timeout_ns(c.timeout_ns), assembler(c.features) {}
};

struct Live {
  std::string model;
  Router router;
  std::vector<std::shared_ptr<LiveVariant>> variants;  // deployment order
  std::vector<std::uint16_t> routed;                   // router index -> variants index
  std::vector<std::uint16_t> shadows;
  int fallback = -1;  // variants index
  std::vector<VariantId> ids;
  std::vector<std::string> versions;
  std::size_t output_dim = 0;
  std::size_t max_in_flight = 0;
  std::shared_ptr<ModelCounters> counters;

  explicit Live(RoutingPolicy policy) : router(std::move(policy)) {}
};

// A few threads for work that must not run on a gRPC or batcher thread (fallbacks, shadows).
class TaskPool {
 public:
  explicit TaskPool(std::size_t threads) {
    for (std::size_t i = 0; i < threads; ++i) threads_.emplace_back([this] { run(); });
  }
  ~TaskPool() { stop(); }
  bool post(std::function<void()> fn, std::size_t max_queued) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopped_ || tasks_.size() >= max_queued) return false;
      tasks_.push_back(std::move(fn));
    }
    cv_.notify_one();
    return true;
  }
  void stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopped_) return;
      stopped_ = true;
    }
    cv_.notify_all();
    for (std::thread& t : threads_) join_or_detach(t);
  }

 private:
  void run() {
    for (;;) {
      std::function<void()> fn;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stopped_ || !tasks_.empty(); });
        if (tasks_.empty()) return;
        fn = std::move(tasks_.front());
        tasks_.pop_front();
      }
      fn();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;
  bool stopped_ = false;
  std::vector<std::thread> threads_;
};

struct Group {
  std::uint16_t variant = 0;  // variants index routed to
  std::uint16_t used = 0;     // variants index that answered
  std::vector<std::uint32_t> rows;
  Matrix x;
  std::vector<std::uint8_t> mask;
  std::vector<std::uint8_t> degraded;
  Matrix y;
};

}  // namespace

bool PredictOutcome::any_degraded() const noexcept {
  return std::any_of(degraded.begin(), degraded.end(), [](std::uint8_t d) { return d != 0; });
}

std::size_t LogBatch::bytes() const noexcept {
  std::size_t b = sizeof(LogBatch) + model.size() + request_id.size() + variant.size();
  for (const std::string& e : entity_ids) b += e.size() + sizeof(std::string);
  b += rows.size() * 4 + features.data.size() * 4 + missing.size() + outputs.data.size() * 4 +
       degraded.size();
  return b;
}

struct Engine::Impl {
  Engine* engine = nullptr;
  std::shared_ptr<FeatureStore> store;
  mutable std::mutex live_mu;
  std::unordered_map<std::string, std::shared_ptr<const Live>> live;
  std::unordered_map<std::string, std::shared_ptr<ModelCounters>> counters;

  mutable std::mutex err_mu;
  std::map<std::pair<std::string, ErrorCode>, std::uint64_t> errors;
  std::atomic<std::uint64_t> shed{0};
  std::atomic<std::uint64_t> store_errors{0};

  TimerQueue timers;
  TaskPool aux{2};

  std::mutex idle_mu;
  std::condition_variable idle_cv;

  mutable std::mutex log_mu;
  std::condition_variable log_cv;
  std::deque<LogBatch> log;
  std::size_t log_bytes = 0;
  std::uint64_t log_dropped = 0;
  std::uint64_t log_records = 0;
  bool log_closed = false;

  std::string id_prefix;
  std::atomic<std::uint64_t> next_id{1};

  std::shared_ptr<const Live> find(std::string_view model) const {
    std::lock_guard<std::mutex> lock(live_mu);
    auto it = live.find(std::string(model));
    return it == live.end() ? nullptr : it->second;
  }

  std::string deployed_names() const {
    std::vector<std::string> names;
    {
      std::lock_guard<std::mutex> lock(live_mu);
      for (const auto& [n, _] : live) names.push_back(n);
    }
    std::sort(names.begin(), names.end());
    return names.empty() ? "none" : join(names);
  }

  // Under the mutex: a waiter between its predicate check and its wait must not miss it.
  void notify_idle() {
    std::lock_guard<std::mutex> lock(idle_mu);
    idle_cv.notify_all();
  }

  void count_error(const std::string& model, ErrorCode code) {
    std::lock_guard<std::mutex> lock(err_mu);
    ++errors[{model, code}];
  }

  void push_log(LogBatch&& b) {
    const std::size_t size = b.bytes();
    {
      std::lock_guard<std::mutex> lock(log_mu);
      if (log_closed || log_bytes + size > engine->options_.log_max_bytes) {
        log_dropped += b.entity_ids.size();
        return;
      }
      log_bytes += size;
      log_records += b.entity_ids.size();
      log.push_back(std::move(b));
    }
    log_cv.notify_one();
  }

  // Cache, then one store read for the misses; fills x/mask and per-entity degraded flags.
  void features(const LiveVariant& v, std::span<const std::string_view> ids, Matrix& x,
                std::vector<std::uint8_t>& mask, std::vector<std::uint8_t>& degraded) {
    const std::size_t n = ids.size();
    FeatureCache& cache = *engine->cache_;
    Plan plan = v.assembler.plan(cache, ids);
    degraded.assign(n, 0);
    if (!plan.miss_keys.empty()) {
      std::vector<std::optional<std::string>> values;
      bool ok = false;
      if (store) {
        try {
          store->mget(plan.miss_keys, values,
                      steady_now_ns() + engine->options_.store_deadline_ns);
          ok = values.size() == plan.miss_keys.size();
        } catch (const std::exception&) {
          ok = false;
        }
      }
      if (!ok) {
        // Store down or slow: what the cache had, defaults for the rest, flagged.
        if (store) store_errors.fetch_add(1, std::memory_order_relaxed);
        for (std::uint32_t slot : plan.miss_slots) degraded[slot % n] = 1;
      } else {
        for (std::size_t m = 0; m < values.size(); ++m) {
          const std::uint32_t slot = plan.miss_slots[m];
          const std::size_t g = slot / n;
          if (!values[m].has_value()) {
            // Negative entry: an unknown entity does not cost a store read per request.
            cache.put(plan.miss_keys[m], nullptr, engine->options_.negative_ttl_ns);
            continue;
          }
          try {
            auto decoded = std::make_shared<DecodedVector>();
            decode_feature_vector(*values[m], *decoded);
            v.assembler.check_vector(g, *decoded);
            VectorPtr vp = std::move(decoded);
            cache.put(plan.miss_keys[m], vp);
            plan.vectors[slot] = std::move(vp);
          } catch (const Error&) {
            degraded[slot % n] = 1;  // one corrupt value degrades that entity only
          }
        }
      }
    }
    const std::size_t groups = v.assembler.group_count();
    for (std::size_t g = 0; g < groups; ++g) {
      for (std::size_t i = 0; i < n; ++i) {
        if (!plan.vectors[g * n + i]) degraded[i] = 1;  // defaults stand in for a missing row
      }
    }
    x = Matrix(n, v.assembler.dim());
    mask.assign(n * v.assembler.dim(), 0);
    v.assembler.assemble(plan, x.data.data(), mask.data());
  }
};

// One request in flight.
struct Call {
  Engine::Impl* impl = nullptr;
  std::shared_ptr<const Live> live;
  PredictCall req;
  PredictDone done;
  std::int64_t start_ns = 0;
  std::vector<std::string_view> ids;
  std::vector<Group> groups;
  std::mutex mu;
  std::size_t pending = 0;
  bool finished = false;
  PredictOutcome out;
  std::string request_id;  // out is handed to the caller; shadows still log under this id
};

namespace {

std::vector<Override> resolve_overrides(const Assembler& a, const std::vector<OverrideInput>& in,
                                        const std::vector<std::uint32_t>* rows) {
  std::vector<Override> out;
  out.reserve(in.size());
  for (const OverrideInput& o : in) {
    std::optional<std::size_t> col = a.column_index(o.name);
    if (!col) {
      throw Error(ErrorCode::kInvalidArgument, "override names unknown feature '" + o.name +
                                                   "'; known: " + join(a.column_names()));
    }
    Override r{*col, {}};
    if (o.values.size() == 1 || rows == nullptr) {
      r.values = o.values;
    } else {
      r.values.reserve(rows->size());
      for (std::uint32_t i : *rows) r.values.push_back(o.values[i]);
    }
    out.push_back(std::move(r));
  }
  return out;
}

// The features of request `c` for variant `v`: cache, store, assembly and the request's
// overrides. `rows`: the request rows this variant answers, or null for all of them.
void assemble(const Call& c, const LiveVariant& v, const std::vector<std::uint32_t>* rows,
              Matrix& x, std::vector<std::uint8_t>& mask, std::vector<std::uint8_t>& degraded) {
  std::vector<std::string_view> sub;
  std::span<const std::string_view> ids = c.ids;
  if (rows != nullptr) {
    sub.reserve(rows->size());
    for (std::uint32_t i : *rows) sub.push_back(c.ids[i]);
    ids = sub;
  }
  c.impl->features(v, ids, x, mask, degraded);
  if (!c.req.overrides.empty()) {
    std::vector<Override> ov = resolve_overrides(v.assembler, c.req.overrides, rows);
    v.assembler.apply_overrides(ov, ids.size(), x.data.data(), mask.data());
  }
}

// A log batch of request `c` for variant `v`, naming its entities (`rows`: null = all).
LogBatch log_batch(const Call& c, const LiveVariant& v, const std::vector<std::uint32_t>* rows) {
  LogBatch b;
  b.model = c.live->model;
  b.request_id = c.request_id;
  b.variant = v.name;
  b.version = v.version;
  b.columns = v.columns;
  if (rows == nullptr) {
    b.entity_ids = c.req.entity_ids;
    b.rows.resize(c.ids.size());
    for (std::size_t i = 0; i < c.ids.size(); ++i) b.rows[i] = static_cast<std::uint32_t>(i);
  } else {
    b.rows = *rows;
    for (std::uint32_t i : *rows) b.entity_ids.push_back(c.req.entity_ids[i]);
  }
  return b;
}

}  // namespace

Engine::Engine(EngineOptions options, std::shared_ptr<FeatureCache> cache,
               std::shared_ptr<FeatureStore> store)
    : options_(options), cache_(std::move(cache)), impl_(std::make_unique<Impl>()) {
  if (!cache_) throw Error(ErrorCode::kInvalidArgument, "engine needs a feature cache");
  if (options_.max_in_flight == 0) {
    throw Error(ErrorCode::kInvalidArgument, "max_in_flight must be > 0");
  }
  if (options_.max_batch == 0) throw Error(ErrorCode::kInvalidArgument, "max_batch must be > 0");
  if (options_.store_deadline_ns <= 0) {
    throw Error(ErrorCode::kInvalidArgument, "store deadline must be > 0");
  }
  if (options_.negative_ttl_ns <= 0) {
    throw Error(ErrorCode::kInvalidArgument, "negative-entry TTL must be > 0");
  }
  impl_->engine = this;
  impl_->store = std::move(store);
  std::random_device rd;
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%08x%04x", rd(), rd() & 0xffffu);
  impl_->id_prefix = std::string(buf) + "-";
}

Engine::~Engine() { close(); }

void Engine::deploy(ModelConfig config) {
  if (config.model.empty()) throw Error(ErrorCode::kInvalidArgument, "model name is empty");
  if (config.variants.empty()) {
    throw Error(ErrorCode::kInvalidArgument,
                "deployment of '" + config.model + "' has no variants");
  }
  if (config.variants.size() > 1000) {
    throw Error(ErrorCode::kInvalidArgument, "too many variants");
  }
  std::vector<std::string> names;
  for (const VariantConfig& v : config.variants) {
    if (std::find(names.begin(), names.end(), v.name) != names.end()) {
      throw Error(ErrorCode::kInvalidArgument, "variant '" + v.name + "' defined twice");
    }
    names.push_back(v.name);
    if (!v.executor) {
      throw Error(ErrorCode::kInvalidArgument, "no backend loaded for variant '" + v.name + "'");
    }
    if (v.timeout_ns <= 0) {
      throw Error(ErrorCode::kInvalidArgument, "variant '" + v.name + "' timeout must be > 0");
    }
  }
  std::vector<std::string> unknown;
  for (const VariantSpec& r : config.policy.variants) {
    if (std::find(names.begin(), names.end(), r.name) == names.end()) unknown.push_back(r.name);
  }
  for (const std::string& s : config.policy.shadows) {
    if (std::find(names.begin(), names.end(), s) == names.end()) unknown.push_back(s);
  }
  if (!unknown.empty()) {
    throw Error(ErrorCode::kInvalidArgument,
                "routing policy names variant(s) [" + join(unknown) +
                    "] that the deployment does not define; defined: [" + join(names) + "]");
  }
  auto live = std::make_shared<Live>(config.policy);
  live->model = config.model;
  live->max_in_flight = config.max_in_flight;
  {
    std::lock_guard<std::mutex> lock(impl_->live_mu);
    auto& c = impl_->counters[config.model];
    if (!c) {
      c = std::make_shared<ModelCounters>();
      c->name = config.model;
    }
    live->counters = c;
  }
  for (const VariantConfig& vc : config.variants) {
    auto v = std::make_shared<LiveVariant>(vc);
    if (vc.executor->input_dim() != v->assembler.dim()) {
      throw Error(ErrorCode::kInvalidArgument,
                  "variant '" + vc.name + "': model input has " +
                      std::to_string(vc.executor->input_dim()) +
                      " columns but its feature spec selects " +
                      std::to_string(v->assembler.dim()));
    }
    v->columns = std::make_shared<const std::vector<std::string>>(v->assembler.column_names());
    v->executor = vc.executor;
    v->breaker = std::make_shared<Breaker>(std::max<std::uint32_t>(1, vc.failure_threshold),
                                           std::max<std::int64_t>(1, vc.reset_after_ns));
    v->counters = live->counters->variant(vc.name, vc.version);
    live->ids.push_back(VariantId{vc.name, vc.version});
    live->variants.push_back(std::move(v));
  }
  auto index_of = [&](const std::string& name) {
    return static_cast<std::uint16_t>(std::find(names.begin(), names.end(), name) - names.begin());
  };
  for (const VariantSpec& r : live->router.variants()) live->routed.push_back(index_of(r.name));
  for (const std::string& s : config.policy.shadows) live->shadows.push_back(index_of(s));
  if (live->router.fallback_index() >= 0) {
    live->fallback = live->routed[static_cast<std::size_t>(live->router.fallback_index())];
  }
  live->output_dim = live->variants[live->routed.empty() ? 0 : live->routed[0]]->executor->output_dim();
  std::vector<std::string> versions;
  for (const auto& v : live->variants) versions.push_back(std::to_string(v->version));
  std::sort(versions.begin(), versions.end());
  versions.erase(std::unique(versions.begin(), versions.end()), versions.end());
  live->versions = std::move(versions);

  // Warm up before switching: the first run allocates and plans, and must not land on a live
  // request; a model that cannot run fails the deploy here.
  for (const auto& v : live->variants) {
    auto promise = std::make_shared<std::promise<std::pair<Status, Matrix>>>();
    auto future = promise->get_future();
    v->executor->infer(Matrix(1, v->assembler.dim()), [promise](Status s, Matrix y) {
      promise->set_value({std::move(s), std::move(y)});
    });
    const auto wait = std::chrono::nanoseconds(std::max<std::int64_t>(v->timeout_ns, 30'000'000'000));
    if (future.wait_for(wait) != std::future_status::ready) {
      throw Error(ErrorCode::kDeadlineExceeded,
                  "variant '" + v->name + "' did not answer its warm-up call");
    }
    auto [status, y] = future.get();
    if (!status.ok()) {
      throw Error(status.code, "variant '" + v->name + "' failed its warm-up call: " + status.message);
    }
    if (y.rows != 1) {
      throw Error(ErrorCode::kInvalidArgument, "variant '" + v->name + "' returned " +
                                                   std::to_string(y.rows) + " rows for 1 input row");
    }
  }
  std::shared_ptr<const Live> old;
  {
    std::lock_guard<std::mutex> lock(impl_->live_mu);
    auto& slot = impl_->live[config.model];
    old = std::move(slot);
    slot = std::move(live);
  }
  // `old` is released here or by the last request still holding it.
}

void Engine::undeploy(std::string_view model) {
  std::shared_ptr<const Live> old;
  std::lock_guard<std::mutex> lock(impl_->live_mu);
  auto it = impl_->live.find(std::string(model));
  if (it != impl_->live.end()) {
    old = std::move(it->second);
    impl_->live.erase(it);
  }
}

std::vector<std::string> Engine::models() const {
  std::vector<std::string> names;
  {
    std::lock_guard<std::mutex> lock(impl_->live_mu);
    for (const auto& [n, _] : impl_->live) names.push_back(n);
  }
  std::sort(names.begin(), names.end());
  return names;
}

std::optional<ModelView> Engine::model(std::string_view name) const {
  auto live = impl_->find(name);
  if (!live) return std::nullopt;
  ModelView v;
  v.name = live->model;
  v.versions = live->versions;
  v.variants = live->ids;
  v.output_dim = live->output_dim;
  const auto& first = live->variants[live->routed.empty() ? 0 : live->routed[0]];
  v.columns = *first->columns;
  return v;
}

bool Engine::ready() const {
  if (draining()) return false;
  std::lock_guard<std::mutex> lock(impl_->live_mu);
  return !impl_->live.empty();
}

void Engine::set_draining(bool draining) { draining_.store(draining); }

bool Engine::wait_idle(std::int64_t timeout_ns) {
  std::unique_lock<std::mutex> lock(impl_->idle_mu);
  return impl_->idle_cv.wait_for(lock, std::chrono::nanoseconds(timeout_ns),
                                 [&] { return in_flight_.load() == 0; });
}

namespace {

void finish(const std::shared_ptr<Call>& c, Status status);
void run_group(const std::shared_ptr<Call>& c, std::size_t gi, std::uint16_t variant,
               bool is_fallback);

// A variant failed to answer (its backend erred or timed out, or its breaker is open),
// whether or not a fallback then answers for it.
void count_variant_error(const Live& live, std::uint16_t variant) {
  VariantCounters& vc = *live.variants[variant]->counters;
  std::lock_guard<std::mutex> lock(vc.mu);
  ++vc.m.errors;
}

void group_failed(const std::shared_ptr<Call>& c, std::size_t gi, std::uint16_t variant,
                  bool is_fallback, Status status) {
  const Live& live = *c->live;
  const bool caller_fault =
      status.code == ErrorCode::kInvalidArgument || status.code == ErrorCode::kDecode;
  if (!caller_fault) count_variant_error(live, variant);
  if (caller_fault || is_fallback || live.fallback < 0 ||
      static_cast<std::uint16_t>(live.fallback) == variant) {
    finish(c, std::move(status));
    return;
  }
  // The fallback answers: its features are assembled off this thread (it may be a batcher
  // worker or the timer thread), since that can mean a store read.
  auto self = c;
  const auto fb = static_cast<std::uint16_t>(live.fallback);
  if (!c->impl->aux.post([self, gi, fb] { run_group(self, gi, fb, true); }, 100'000)) {
    finish(c, std::move(status));
  }
}

void group_done(const std::shared_ptr<Call>& c, std::size_t gi, std::uint16_t used,
                bool is_fallback, Matrix y) {
  bool last = false;
  bool mismatch = false;
  {
    std::lock_guard<std::mutex> lock(c->mu);
    if (c->finished) return;
    Group& g = c->groups[gi];
    const std::size_t n = c->ids.size();
    if (c->out.outputs.rows == 0) c->out.outputs = Matrix(n, y.cols);
    if (c->out.outputs.cols != y.cols) {
      mismatch = true;  // variants of one model disagree on output width: a deployment error
    } else {
      g.used = used;
      const std::uint8_t fb = is_fallback ? 1 : 0;
      if (g.rows.empty()) {
        std::memcpy(c->out.outputs.data.data(), y.data.data(), y.data.size() * sizeof(float));
        for (std::size_t i = 0; i < n; ++i) {
          c->out.variant[i] = used;
          c->out.degraded[i] = g.degraded[i] | fb;
        }
      } else {
        for (std::size_t j = 0; j < g.rows.size(); ++j) {
          const std::uint32_t i = g.rows[j];
          std::memcpy(c->out.outputs.row(i), y.row(j), y.cols * sizeof(float));
          c->out.variant[i] = used;
          c->out.degraded[i] = g.degraded[j] | fb;
        }
      }
      if (is_fallback) std::fill(g.degraded.begin(), g.degraded.end(), 1);
      g.y = std::move(y);
      last = --c->pending == 0;
    }
  }
  if (mismatch) {
    count_variant_error(*c->live, used);
    finish(c, Status{ErrorCode::kInternal,
                     "variants of model '" + c->req.model + "' return different output widths"});
  } else if (last) {
    finish(c, Status::Ok());
  }
}

void run_group(const std::shared_ptr<Call>& c, std::size_t gi, std::uint16_t variant,
               bool is_fallback) {
  const Live& live = *c->live;
  const LiveVariant& v = *live.variants[variant];
  Group& g = c->groups[gi];
  Matrix x;
  std::vector<std::uint8_t> mask;
  std::vector<std::uint8_t> degraded;
  try {
    assemble(*c, v, g.rows.empty() ? nullptr : &g.rows, x, mask, degraded);
  } catch (const Error& e) {
    Status status = Status::From(e);
    if (status.code != ErrorCode::kInvalidArgument && status.code != ErrorCode::kDecode) {
      count_variant_error(live, variant);
    }
    finish(c, std::move(status));
    return;
  }
  {
    std::lock_guard<std::mutex> lock(c->mu);
    g.mask = std::move(mask);
    g.degraded = std::move(degraded);
    if (c->impl->engine->options().log_predictions) g.x = x;
  }
  if (!v.breaker->allow()) {
    group_failed(c, gi, variant, is_fallback,
                 Status{ErrorCode::kUnavailable,
                        "variant '" + v.name + "' circuit breaker is open"});
    return;
  }
  auto settled = std::make_shared<std::atomic<bool>>(false);
  auto breaker = v.breaker;
  std::uint64_t timer = 0;
  const bool timed = !v.executor->in_process();
  if (timed) {
    auto self = c;
    const std::string name = v.name;
    const std::int64_t timeout = v.timeout_ns;
    timer = c->impl->timers.schedule(
        steady_now_ns() + v.timeout_ns, [self, gi, variant, is_fallback, settled, breaker, name,
                                         timeout] {
          if (settled->exchange(true)) return;
          breaker->failure();
          group_failed(self, gi, variant, is_fallback,
                       Status{ErrorCode::kDeadlineExceeded,
                              "variant '" + name + "' did not answer within " +
                                  seconds_text(timeout)});
        });
  }
  auto self = c;
  v.executor->infer(std::move(x), [self, gi, variant, is_fallback, settled, breaker, timed,
                                   timer](Status s, Matrix y) {
    if (settled->exchange(true)) return;
    if (timed) self->impl->timers.cancel(timer);
    if (!s.ok()) {
      if (s.code != ErrorCode::kInvalidArgument) breaker->failure();
      group_failed(self, gi, variant, is_fallback, std::move(s));
      return;
    }
    breaker->success();
    group_done(self, gi, variant, is_fallback, std::move(y));
  });
}

void run_shadows(const std::shared_ptr<Call>& c) {
  const Live& live = *c->live;
  Engine::Impl* impl = c->impl;
  for (std::uint16_t s : live.shadows) {
    const LiveVariant& v = *live.variants[s];
    Matrix x;
    std::vector<std::uint8_t> mask;
    std::vector<std::uint8_t> degraded;
    try {
      assemble(*c, v, nullptr, x, mask, degraded);
    } catch (const Error&) {
      continue;  // a shadow never affects callers
    }
    if (!v.breaker->allow()) continue;
    std::shared_ptr<LogBatch> batch;  // null: predictions are not logged
    if (impl->engine->options().log_predictions) {
      batch = std::make_shared<LogBatch>(log_batch(*c, v, nullptr));
      batch->features = x;
      batch->missing = std::move(mask);
      batch->degraded = std::move(degraded);
      batch->shadow = true;
    }
    auto breaker = v.breaker;
    v.executor->infer(std::move(x), [impl, batch, breaker](Status st, Matrix y) {
      if (!st.ok()) {
        breaker->failure();
        return;
      }
      breaker->success();
      if (!batch) return;
      batch->outputs = std::move(y);
      batch->timestamp_ms = wall_ms();
      impl->push_log(std::move(*batch));
    });
  }
}

void finish(const std::shared_ptr<Call>& c, Status status) {
  PredictDone done;
  {
    std::lock_guard<std::mutex> lock(c->mu);
    if (c->finished) return;
    c->finished = true;
    done = std::move(c->done);
  }
  Engine::Impl* impl = c->impl;
  Engine* engine = impl->engine;
  const std::int64_t elapsed = steady_now_ns() - c->start_ns;
  c->out.latency_us = elapsed / 1000;
  const Live& live = *c->live;
  ModelCounters& mc = *live.counters;
  mc.last_ms.store(static_cast<std::uint64_t>(wall_ms()), std::memory_order_relaxed);
  const bool ok = status.ok();
  if (ok) {
    mc.success_count.fetch_add(1, std::memory_order_relaxed);
    mc.success_ns.fetch_add(static_cast<std::uint64_t>(elapsed), std::memory_order_relaxed);
    const std::size_t n = c->ids.size();
    mc.entities.fetch_add(n, std::memory_order_relaxed);
    std::uint64_t degraded = 0;
    for (std::uint8_t d : c->out.degraded) degraded += d;
    if (degraded) mc.degraded.fetch_add(degraded, std::memory_order_relaxed);
    // Latency per variant that answered.
    const double seconds = static_cast<double>(elapsed) / 1e9;
    std::size_t bucket = kLatencyBuckets.size();
    for (std::size_t b = 0; b < kLatencyBuckets.size(); ++b) {
      if (seconds <= kLatencyBuckets[b]) {
        bucket = b;
        break;
      }
    }
    for (const Group& g : c->groups) {
      std::uint64_t group_degraded = 0;
      if (g.rows.empty()) {
        group_degraded = degraded;
      } else {
        for (std::uint32_t row : g.rows) group_degraded += c->out.degraded[row];
      }
      VariantCounters& vc = *live.variants[g.used]->counters;
      std::lock_guard<std::mutex> lock(vc.mu);
      ++vc.m.requests;
      vc.m.entities += g.rows.empty() ? n : g.rows.size();
      vc.m.degraded += group_degraded;
      vc.m.latency_sum_s += seconds;
      ++vc.m.buckets[bucket];
    }
    if (engine->options().log_predictions) {
      const std::int64_t ts = wall_ms();
      for (Group& g : c->groups) {
        LogBatch b = log_batch(*c, *live.variants[g.used], g.rows.empty() ? nullptr : &g.rows);
        b.features = std::move(g.x);  // the answering variant's (a fallback's replaced them)
        b.missing = std::move(g.mask);
        b.outputs = std::move(g.y);
        b.degraded = g.degraded;
        b.latency_us = c->out.latency_us;
        b.timestamp_ms = ts;
        impl->push_log(std::move(b));
      }
    }
  } else {
    mc.fail_count.fetch_add(1, std::memory_order_relaxed);
    mc.fail_ns.fetch_add(static_cast<std::uint64_t>(elapsed), std::memory_order_relaxed);
    impl->count_error(live.model, status.code);
  }
  // Release admission before answering: a caller that sends its next request as soon as it
  // has this answer must find the slot free.
  mc.in_flight.fetch_sub(1, std::memory_order_relaxed);
  if (engine->in_flight_dec() == 0) impl->notify_idle();
  const bool shadows = ok && !live.shadows.empty();
  if (done) {
    if (ok) {
      done(Status::Ok(), std::move(c->out));
    } else {
      done(std::move(status), PredictOutcome{});
    }
  }
  if (shadows) {
    auto self = c;
    impl->aux.post([self] { run_shadows(self); }, 10'000);
  }
}

}  // namespace

std::size_t Engine::in_flight_dec() noexcept { return in_flight_.fetch_sub(1) - 1; }

void Engine::predict(PredictCall call, PredictDone done) {
  const std::int64_t start = steady_now_ns();
  auto fail_now = [&](ErrorCode code, std::string message) {
    impl_->count_error(call.model, code);
    done(Status{code, std::move(message)}, PredictOutcome{});
  };
  if (draining()) {
    fail_now(ErrorCode::kUnavailable, "gateway is shutting down; retry on another replica");
    return;
  }
  // Admission first: past the bound, refuse before doing any work or queueing anything.
  if (in_flight_.fetch_add(1) >= options_.max_in_flight) {
    in_flight_dec();
    impl_->shed.fetch_add(1, std::memory_order_relaxed);
    fail_now(ErrorCode::kResourceExhausted,
             "gateway is at its in-flight limit (" + std::to_string(options_.max_in_flight) +
                 "); retry with backoff");
    return;
  }
  std::shared_ptr<const Live> live = impl_->find(call.model);
  if (!live) {
    if (in_flight_dec() == 0) impl_->notify_idle();
    fail_now(ErrorCode::kNotFound, "model '" + call.model + "' is not deployed; deployed: " +
                                       impl_->deployed_names());
    return;
  }
  if (live->counters->in_flight.fetch_add(1) >= (live->max_in_flight ? live->max_in_flight
                                                                     : options_.max_in_flight)) {
    live->counters->in_flight.fetch_sub(1);
    if (in_flight_dec() == 0) impl_->notify_idle();
    impl_->shed.fetch_add(1, std::memory_order_relaxed);
    fail_now(ErrorCode::kResourceExhausted,
             "model '" + call.model + "' is at its in-flight limit (" +
                 std::to_string(live->max_in_flight) + "); retry with backoff");
    return;
  }
  auto c = std::make_shared<Call>();
  c->impl = impl_.get();
  c->live = std::move(live);
  c->req = std::move(call);
  c->done = std::move(done);
  c->start_ns = start;
  const Live& lv = *c->live;
  const std::size_t n = c->req.entity_ids.size();
  try {
    if (!c->req.version.empty() &&
        std::find(lv.versions.begin(), lv.versions.end(), c->req.version) == lv.versions.end()) {
      throw Error(ErrorCode::kNotFound, "model '" + lv.model + "' has no deployed version " +
                                            c->req.version + "; deployed: [" +
                                            join(lv.versions) + "]");
    }
    if (n == 0) throw Error(ErrorCode::kInvalidArgument, "entity_ids is empty");
    if (n > options_.max_batch) {
      throw Error(ErrorCode::kInvalidArgument, "batch of " + std::to_string(n) +
                                                   " entities is over the limit of " +
                                                   std::to_string(options_.max_batch));
    }
    for (const std::string& e : c->req.entity_ids) {
      // One huge id would cost every other request its store read (the shared deadline).
      if (e.size() > options_.max_entity_id_bytes) {
        throw Error(ErrorCode::kInvalidArgument,
                    "an entity id of " + std::to_string(e.size()) + " bytes is over the limit of " +
                        std::to_string(options_.max_entity_id_bytes));
      }
    }
    for (const OverrideInput& o : c->req.overrides) {
      if (o.values.size() != 1 && o.values.size() != n) {
        throw Error(ErrorCode::kInvalidArgument,
                    "override '" + o.name + "' has " + std::to_string(o.values.size()) +
                        " values; expected 1 or one per entity (" + std::to_string(n) + ")");
      }
      for (float f : o.values) {
        if (!std::isfinite(f)) {
          throw Error(ErrorCode::kInvalidArgument,
                      "override '" + o.name + "' has a non-finite value (NaN or Inf)");
        }
      }
    }
    c->ids.reserve(n);
    for (const std::string& e : c->req.entity_ids) c->ids.push_back(e);
    // Route; group entities by variant (one group, without row lists, in the common case).
    std::vector<std::uint32_t> routed(n);
    lv.router.route_many(c->ids, routed.data());
    const std::uint32_t first = routed[0];
    const bool single = std::all_of(routed.begin(), routed.end(),
                                    [first](std::uint32_t r) { return r == first; });
    if (single) {
      Group g;
      g.variant = g.used = lv.routed[first];
      c->groups.push_back(std::move(g));
    } else {
      std::vector<int> slot(lv.routed.size(), -1);
      for (std::size_t i = 0; i < n; ++i) {
        const std::uint32_t r = routed[i];
        if (slot[r] < 0) {
          slot[r] = static_cast<int>(c->groups.size());
          Group g;
          g.variant = g.used = lv.routed[r];
          c->groups.push_back(std::move(g));
        }
        c->groups[static_cast<std::size_t>(slot[r])].rows.push_back(static_cast<std::uint32_t>(i));
      }
    }
    // Unknown override names are the caller's error whichever variant they land on.
    for (const Group& g : c->groups) {
      resolve_overrides(lv.variants[g.variant]->assembler, c->req.overrides, nullptr);
    }
  } catch (const Error& e) {
    finish(c, Status::From(e));
    return;
  }
  c->out.model = lv.model;
  c->out.request_id = c->req.request_id.empty()
                          ? impl_->id_prefix + [&] {
                              char buf[24];
                              std::snprintf(buf, sizeof(buf), "%llx",
                                            static_cast<unsigned long long>(
                                                impl_->next_id.fetch_add(1)));
                              return std::string(buf);
                            }()
                          : c->req.request_id;
  c->request_id = c->out.request_id;
  c->out.variants = lv.ids;
  c->out.variant.assign(n, 0);
  c->out.degraded.assign(n, 0);
  c->pending = c->groups.size();
  for (std::size_t gi = 0; gi < c->groups.size(); ++gi) {
    run_group(c, gi, c->groups[gi].variant, false);
  }
}

std::vector<ModelStatsSnapshot> Engine::statistics(std::string_view model) const {
  std::vector<ModelStatsSnapshot> out;
  std::lock_guard<std::mutex> lock(impl_->live_mu);
  for (const auto& [name, c] : impl_->counters) {
    if (!model.empty() && name != model) continue;
    if (model.empty() && impl_->live.find(name) == impl_->live.end()) continue;
    ModelStatsSnapshot s;
    s.name = name;
    s.success_count = c->success_count.load();
    s.success_ns = c->success_ns.load();
    s.fail_count = c->fail_count.load();
    s.fail_ns = c->fail_ns.load();
    s.last_inference_ms = c->last_ms.load();
    s.entities = c->entities.load();
    out.push_back(std::move(s));
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  return out;
}

EngineMetrics Engine::metrics() const {
  EngineMetrics m;
  {
    std::lock_guard<std::mutex> lock(impl_->live_mu);
    for (const auto& [name, c] : impl_->counters) {
      std::lock_guard<std::mutex> clock(c->mu);
      for (const auto& [key, vc] : c->variants) {
        std::lock_guard<std::mutex> vlock(vc->mu);
        if (vc->m.requests > 0 || vc->m.errors > 0) m.variants.push_back(vc->m);
      }
      m.degraded.emplace_back(name, c->degraded.load());
    }
  }
  {
    std::lock_guard<std::mutex> lock(impl_->err_mu);
    for (const auto& [key, count] : impl_->errors) {
      m.errors.push_back(ErrorCount{key.first, key.second, count});
    }
  }
  m.shed = impl_->shed.load();
  m.store_errors = impl_->store_errors.load();
  {
    std::lock_guard<std::mutex> lock(impl_->log_mu);
    m.log_dropped = impl_->log_dropped;
    m.log_records = impl_->log_records;
    m.log_queued_bytes = impl_->log_bytes;
  }
  m.in_flight = in_flight_.load();
  m.max_in_flight = options_.max_in_flight;
  return m;
}

bool Engine::drain_log(std::vector<LogBatch>& out, std::size_t max_records,
                       std::int64_t wait_ns) {
  std::unique_lock<std::mutex> lock(impl_->log_mu);
  if (impl_->log.empty() && !impl_->log_closed && wait_ns > 0) {
    impl_->log_cv.wait_for(lock, std::chrono::nanoseconds(wait_ns),
                           [&] { return impl_->log_closed || !impl_->log.empty(); });
  }
  std::size_t records = 0;
  while (!impl_->log.empty() && (records == 0 || records < max_records)) {
    records += impl_->log.front().entity_ids.size();
    impl_->log_bytes -= impl_->log.front().bytes();
    out.push_back(std::move(impl_->log.front()));
    impl_->log.pop_front();
  }
  return !(impl_->log_closed && impl_->log.empty() && out.empty());
}

void Engine::close_log() {
  {
    std::lock_guard<std::mutex> lock(impl_->log_mu);
    impl_->log_closed = true;
  }
  impl_->log_cv.notify_all();
}

void Engine::close() {
  if (!impl_) return;
  draining_.store(true);
  impl_->aux.stop();
  impl_->timers.stop();
  std::vector<std::shared_ptr<const Live>> all;
  {
    std::lock_guard<std::mutex> lock(impl_->live_mu);
    for (auto& [_, l] : impl_->live) all.push_back(l);
  }
  for (const auto& l : all) {
    for (const auto& v : l->variants) v->executor->close();
  }
  close_log();
}

}  // namespace carrara::core
