// carrara._native: the pybind11 layer over core/. It only converts: Python objects in,
// core calls with the GIL released, numpy arrays / Python objects out, core errors mapped to
// carrara.errors classes (one function: translate_error).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <future>

#include "carrara/core/assembler.hpp"
#include "carrara/core/engine.hpp"
#include "carrara/core/executor.hpp"
#include "carrara/core/feature_store.hpp"
#include "carrara/core/redis_store.hpp"
#include "carrara/server/grpc_server.hpp"
#include "carrara/server/triton_executor.hpp"
#include "carrara/core/cache.hpp"
#include "carrara/core/clock.hpp"
#include "carrara/core/error.hpp"
#include "carrara/core/feature_vector.hpp"
#include "carrara/core/router.hpp"

namespace py = pybind11;
namespace cc = carrara::core;

namespace {

constexpr double kNsPerSecond = 1e9;

// --- conversions -------------------------------------------------------------------------

// UTF-8 view of a str; valid while the str lives (CPython caches the UTF-8 form).
std::string_view str_view(py::handle h, const char* what) {
  if (!PyUnicode_Check(h.ptr())) {
    throw py::type_error(std::string(what) + " must be str, not " +
                         std::string(py::str(py::type::of(h).attr("__name__"))));
  }
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(h.ptr(), &size);
  if (data == nullptr) throw py::error_already_set();
  return {data, static_cast<std::size_t>(size)};
}

// View of bytes / bytearray; valid while the object lives and is not resized.
std::string_view bytes_view(py::handle h, const char* what) {
  if (PyBytes_Check(h.ptr())) {
    return {PyBytes_AS_STRING(h.ptr()), static_cast<std::size_t>(PyBytes_GET_SIZE(h.ptr()))};
  }
  if (PyByteArray_Check(h.ptr())) {
    return {PyByteArray_AS_STRING(h.ptr()),
            static_cast<std::size_t>(PyByteArray_GET_SIZE(h.ptr()))};
  }
  throw py::type_error(std::string(what) + " must be bytes, not " +
                       std::string(py::str(py::type::of(h).attr("__name__"))));
}

std::vector<std::string_view> str_views(const py::sequence& seq, const char* what) {
  std::vector<std::string_view> out;
  out.reserve(static_cast<std::size_t>(py::len(seq)));
  for (py::handle h : seq) out.push_back(str_view(h, what));
  return out;
}

std::int64_t seconds_to_ns(double seconds, const char* what) {
  if (!(seconds > 0.0) || seconds > 1e9) {
    throw cc::Error(cc::ErrorCode::kInvalidArgument,
                    std::string(what) + " must be a positive number of seconds");
  }
  return static_cast<std::int64_t>(seconds * kNsPerSecond);
}

using MutableVectorPtr = std::shared_ptr<cc::DecodedVector>;

MutableVectorPtr unconst(const cc::VectorPtr& v) {
  // Python sees FeatureVector as read-only (no setters), so sharing the cached object is safe.
  return std::const_pointer_cast<cc::DecodedVector>(v);
}

py::object vector_or_none(const cc::VectorPtr& v) {
  if (!v) return py::none();
  return py::cast(unconst(v));
}

// A value given as FeatureVector or as its encoded bytes -> a shared decoded vector.
// Bytes are decoded without the GIL (the caller holds a reference to the bytes object).
cc::VectorPtr to_vector(py::handle h) {
  if (py::isinstance<cc::DecodedVector>(h)) return h.cast<MutableVectorPtr>();
  std::string_view b = bytes_view(h, "feature vector value");
  py::gil_scoped_release nogil;
  return cc::decode_feature_vector(b);
}

// --- errors ------------------------------------------------------------------------------

// The one place native error codes become Python exceptions (classes from carrara.errors).
void set_python_error(int code, const char* message) {
  py::object cls = py::module_::import("carrara.errors").attr("error_for_code")(code);
  py::set_error(cls, message);
}

void translate_error(std::exception_ptr p) {
  try {
    if (p) std::rethrow_exception(p);
  } catch (const cc::Error& e) {
    set_python_error(static_cast<int>(e.code()), e.what());
  }
}

// --- FeatureVector -----------------------------------------------------------------------

MutableVectorPtr make_vector(std::string entity_id, std::string group, std::uint32_t version,
                             const py::array_t<float, py::array::c_style | py::array::forcecast>& values,
                             const std::optional<py::array_t<bool, py::array::c_style | py::array::forcecast>>& missing,
                             std::int64_t event_ts, std::int64_t created_ts) {
  if (values.ndim() != 1) {
    throw cc::Error(cc::ErrorCode::kInvalidArgument, "values must be one-dimensional");
  }
  auto v = std::make_shared<cc::DecodedVector>();
  v->entity_id = std::move(entity_id);
  v->group = std::move(group);
  v->group_version = version;
  v->event_timestamp_us = event_ts;
  v->created_timestamp_us = created_ts;
  const auto n = static_cast<std::size_t>(values.shape(0));
  v->values.assign(values.data(), values.data() + n);
  v->missing.assign(n, 0);
  if (missing.has_value()) {
    if (missing->ndim() != 1 || static_cast<std::size_t>(missing->shape(0)) != n) {
      throw cc::Error(cc::ErrorCode::kInvalidArgument,
                      "missing must be one boolean per value (" + std::to_string(n) + ")");
    }
    const bool* m = missing->data();
    for (std::size_t i = 0; i < n; ++i) v->missing[i] = m[i] ? 1 : 0;
  }
  return v;
}

py::array_t<float> values_array(const cc::DecodedVector& v) {
  return py::array_t<float>(static_cast<py::ssize_t>(v.values.size()), v.values.data());
}

py::array_t<bool> missing_array(const cc::DecodedVector& v) {
  py::array_t<bool> out(static_cast<py::ssize_t>(v.missing.size()));
  if (!v.missing.empty()) std::memcpy(out.mutable_data(), v.missing.data(), v.missing.size());
  return out;
}

// --- FeatureCache ------------------------------------------------------------------------

class PyFeatureCache {
 public:
  PyFeatureCache(std::size_t capacity, double ttl_seconds, std::size_t shards,
                 std::optional<std::shared_ptr<cc::ManualClock>> clock)
      : cache_(std::make_shared<cc::FeatureCache>(
            cc::CacheOptions{capacity, seconds_to_ns(ttl_seconds, "ttl_seconds"), shards},
            clock.value_or(nullptr))) {}

  void put(py::handle key, py::handle value, std::optional<double> ttl_seconds) {
    std::string_view k = str_view(key, "key");
    const std::int64_t ttl = ttl_seconds ? seconds_to_ns(*ttl_seconds, "ttl_seconds") : 0;
    cc::VectorPtr v = to_vector(value);
    py::gil_scoped_release nogil;
    cache_->put(k, std::move(v), ttl);
  }

  void put_many(const py::sequence& keys, const py::sequence& values,
                std::optional<double> ttl_seconds) {
    if (py::len(keys) != py::len(values)) {
      throw cc::Error(cc::ErrorCode::kInvalidArgument,
                      "put_many got " + std::to_string(py::len(keys)) + " keys and " +
                          std::to_string(py::len(values)) + " values");
    }
    const std::int64_t ttl = ttl_seconds ? seconds_to_ns(*ttl_seconds, "ttl_seconds") : 0;
    std::vector<std::string_view> ks = str_views(keys, "key");
    std::vector<cc::VectorPtr> vs;
    vs.reserve(ks.size());
    for (py::handle h : values) vs.push_back(to_vector(h));
    py::gil_scoped_release nogil;
    for (std::size_t i = 0; i < ks.size(); ++i) cache_->put(ks[i], std::move(vs[i]), ttl);
  }

  py::object get(py::handle key) {
    std::string_view k = str_view(key, "key");
    cc::VectorPtr v;
    {
      py::gil_scoped_release nogil;
      cache_->get(k, v);
    }
    return vector_or_none(v);
  }

  py::list get_many(const py::sequence& keys) {
    std::vector<std::string_view> ks = str_views(keys, "key");
    std::vector<cc::VectorPtr> vs(ks.size());
    {
      py::gil_scoped_release nogil;
      for (std::size_t i = 0; i < ks.size(); ++i) cache_->get(ks[i], vs[i]);
    }
    py::list out(vs.size());
    for (std::size_t i = 0; i < vs.size(); ++i) out[i] = vector_or_none(vs[i]);
    return out;
  }

  bool contains(py::handle key) const { return cache_->contains(str_view(key, "key")); }
  bool erase(py::handle key) { return cache_->erase(str_view(key, "key")); }
  void clear() { cache_->clear(); }
  std::size_t purge_expired() {
    py::gil_scoped_release nogil;
    return cache_->purge_expired();
  }
  std::size_t size() const { return cache_->size(); }

  py::dict stats() const {
    cc::CacheStats s = cache_->stats();
    py::dict d;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    d["insertions"] = s.insertions;
    d["evictions"] = s.evictions;
    d["expirations"] = s.expirations;
    d["size"] = s.size;
    return d;
  }

  cc::FeatureCache& native() { return *cache_; }
  const cc::FeatureCache& native() const { return *cache_; }
  const std::shared_ptr<cc::FeatureCache>& shared() const { return cache_; }

 private:
  std::shared_ptr<cc::FeatureCache> cache_;
};

// --- Assembler ---------------------------------------------------------------------------

cc::AssemblerSpec spec_from_python(py::handle spec) {
  cc::AssemblerSpec out;
  for (py::handle g : spec.attr("groups")) {
    cc::GroupSchema gs;
    gs.name = py::cast<std::string>(g.attr("name"));
    gs.version = py::cast<std::uint32_t>(g.attr("version"));
    for (py::handle f : g.attr("features")) gs.features.push_back(py::cast<std::string>(f));
    out.groups.push_back(std::move(gs));
  }
  for (py::handle f : spec.attr("features")) {
    out.features.push_back(cc::FeatureRef{py::cast<std::string>(f.attr("group")),
                                          py::cast<std::string>(f.attr("feature")),
                                          py::cast<float>(f.attr("default"))});
  }
  return out;
}

std::vector<cc::Override> overrides_from_python(const cc::Assembler& a, const py::object& overrides) {
  std::vector<cc::Override> out;
  if (overrides.is_none()) return out;
  for (auto item : py::cast<py::dict>(overrides)) {
    std::string_view name = str_view(item.first, "override name");
    std::optional<std::size_t> col = a.column_index(name);
    if (!col) {
      std::string known;
      for (const std::string& n : a.column_names()) known += (known.empty() ? "" : ", ") + n;
      throw cc::Error(cc::ErrorCode::kInvalidArgument,
                      "override names unknown feature '" + std::string(name) + "'; known: " + known);
    }
    auto arr = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(item.second);
    if (!arr || arr.ndim() > 1) {
      throw cc::Error(cc::ErrorCode::kInvalidArgument,
                      "override '" + std::string(name) + "' must be a number or a 1-D array");
    }
    out.push_back(cc::Override{*col, std::vector<float>(arr.data(), arr.data() + arr.size())});
  }
  return out;
}

struct PyPlan {
  cc::Plan plan;
};

py::tuple run_assembly(const cc::Assembler& a, std::size_t n,
                       const std::vector<cc::Override>& overrides,
                       const std::function<void(float*, std::uint8_t*)>& fill) {
  const auto rows = static_cast<py::ssize_t>(n);
  const auto cols = static_cast<py::ssize_t>(a.dim());
  py::array_t<float> out({rows, cols});
  py::array_t<bool> mask({rows, cols});
  float* o = out.mutable_data();
  auto* m = reinterpret_cast<std::uint8_t*>(mask.mutable_data());
  {
    // Assembly touches only native memory: let other Python threads run meanwhile.
    py::gil_scoped_release nogil;
    fill(o, m);
    a.apply_overrides(overrides, n, o, m);
  }
  return py::make_tuple(out, mask);
}

py::tuple assemble_vectors(const cc::Assembler& a, const py::sequence& per_group,
                           const py::object& overrides) {
  const std::size_t groups = a.group_count();
  if (static_cast<std::size_t>(py::len(per_group)) != groups) {
    throw cc::Error(cc::ErrorCode::kInvalidArgument,
                    "assemble needs one list per feature group (" + std::to_string(groups) +
                        "), got " + std::to_string(py::len(per_group)));
  }
  std::size_t n = 0;
  std::vector<py::sequence> lists;
  for (std::size_t g = 0; g < groups; ++g) {
    lists.push_back(py::cast<py::sequence>(per_group[g]));
    const auto len = static_cast<std::size_t>(py::len(lists.back()));
    if (g == 0) n = len;
    if (len != n) {
      throw cc::Error(cc::ErrorCode::kInvalidArgument,
                      "every group needs one value per entity: group 0 has " + std::to_string(n) +
                          ", group " + std::to_string(g) + " has " + std::to_string(len));
    }
  }
  // Collect inputs with the GIL, decode and assemble without it.
  std::vector<cc::VectorPtr> given(groups * n);
  std::vector<std::string_view> raw(groups * n);
  std::vector<std::uint8_t> is_raw(groups * n, 0);
  for (std::size_t g = 0; g < groups; ++g) {
    for (std::size_t i = 0; i < n; ++i) {
      py::handle h = lists[g][i];
      if (h.is_none()) continue;
      if (py::isinstance<cc::DecodedVector>(h)) {
        given[g * n + i] = h.cast<MutableVectorPtr>();
      } else {
        raw[g * n + i] = bytes_view(h, "feature vector value");
        is_raw[g * n + i] = 1;
      }
    }
  }
  std::vector<cc::Override> ov = overrides_from_python(a, overrides);
  std::vector<cc::DecodedVector> decoded;
  return run_assembly(a, n, ov, [&](float* o, std::uint8_t* m) {
    std::vector<const cc::DecodedVector*> ptrs(groups * n, nullptr);
    decoded.resize(groups * n);
    for (std::size_t s = 0; s < groups * n; ++s) {
      if (is_raw[s]) {
        cc::decode_feature_vector(raw[s], decoded[s]);
        ptrs[s] = &decoded[s];
      } else {
        ptrs[s] = given[s].get();
      }
      if (ptrs[s] != nullptr) a.check_vector(s / n, *ptrs[s]);
    }
    a.assemble(ptrs, n, o, m);
  });
}

// --- Router ------------------------------------------------------------------------------

cc::RoutingPolicy policy_from_python(py::handle policy) {
  cc::RoutingPolicy out;
  out.salt = py::cast<std::string>(policy.attr("salt"));
  for (py::handle v : policy.attr("variants")) {
    out.variants.push_back(cc::VariantSpec{py::cast<std::string>(v.attr("name")),
                                           py::cast<std::uint32_t>(v.attr("weight_bp")),
                                           py::cast<bool>(v.attr("canary"))});
  }
  for (py::handle s : policy.attr("shadows")) out.shadows.push_back(py::cast<std::string>(s));
  py::object fb = policy.attr("fallback");
  if (!fb.is_none()) out.fallback = py::cast<std::string>(fb);
  return out;
}


// --- serving engine ----------------------------------------------------------------------

bool finalizing() noexcept { return Py_IsInitialized() == 0 || _Py_IsFinalizing() != 0; }

// A Python object owned by native code that may drop it on any thread: the reference is
// released with the GIL held (and leaked, not touched, once the interpreter is going away).
class GilObject {
 public:
  explicit GilObject(py::object obj) : obj_(std::move(obj)) {}
  GilObject(const GilObject&) = delete;
  GilObject& operator=(const GilObject&) = delete;
  ~GilObject() {
    if (finalizing()) {
      obj_.release();
      return;
    }
    py::gil_scoped_acquire gil;
    obj_ = py::object();
  }
  const py::object& get() const noexcept { return obj_; }

 private:
  py::object obj_;
};

// The error code of a Python exception raised by a store or a model: carrara errors keep
// theirs (by grpc_code), anything else is internal.
cc::Status status_from_python(py::error_already_set& e, const std::string& context) {
  cc::ErrorCode code = cc::ErrorCode::kInternal;
  py::object value = e.value();
  std::string message;
  try {
    if (py::hasattr(value, "grpc_code")) {
      const auto name = py::cast<std::string>(value.attr("grpc_code"));
      for (int c = 0; c < cc::kErrorCodeCount; ++c) {
        if (name == cc::error_code_name(static_cast<cc::ErrorCode>(c))) {
          code = static_cast<cc::ErrorCode>(c);
        }
      }
      message = py::str(value);
    } else {
      message = context + ": " + std::string(py::str(py::type::of(value).attr("__name__"))) +
                ": " + std::string(py::str(value));
    }
  } catch (const std::exception&) {
    message = context + " failed";
  }
  return cc::Status{code, message};
}

// The online store as a Python object with mget(keys) -> list[bytes | None] (embedded stores,
// test doubles). Called with the GIL; its failures degrade the request like Redis's.
class PythonStore final : public cc::FeatureStore {
 public:
  explicit PythonStore(py::object reader) : reader_(std::make_shared<GilObject>(std::move(reader))) {}

  void mget(std::span<const std::string> keys, std::vector<std::optional<std::string>>& out,
            std::int64_t /*deadline_ns: a Python store cannot be abandoned mid-call*/) override {
    if (finalizing()) throw cc::Error(cc::ErrorCode::kUnavailable, "interpreter is shutting down");
    py::gil_scoped_acquire gil;
    try {
      py::list ks(keys.size());
      for (std::size_t i = 0; i < keys.size(); ++i) {
        ks[i] = py::str(keys[i].data(), keys[i].size());
      }
      py::object values = reader_->get().attr("mget")(ks);
      auto seq = py::cast<py::sequence>(values);
      if (static_cast<std::size_t>(py::len(seq)) != keys.size()) {
        throw cc::Error(cc::ErrorCode::kUnavailable, "online store returned " +
                                                         std::to_string(py::len(seq)) +
                                                         " values for " +
                                                         std::to_string(keys.size()) + " keys");
      }
      out.clear();
      out.reserve(keys.size());
      for (py::handle h : seq) {
        if (h.is_none()) {
          out.emplace_back(std::nullopt);
        } else {
          std::string_view b = bytes_view(h, "online-store value");
          out.emplace_back(std::string(b));
        }
      }
    } catch (py::error_already_set& e) {
      cc::Status st = status_from_python(e, "online store");
      throw cc::Error(cc::ErrorCode::kUnavailable, st.message);
    } catch (const py::cast_error& e) {
      throw cc::Error(cc::ErrorCode::kUnavailable, std::string("online store: ") + e.what());
    }
  }

 private:
  std::shared_ptr<GilObject> reader_;
};

// The batch function of an in-process model: one GIL acquisition per batch, the batch handed
// to backend.infer as a float32 [n, d] array.
cc::BatchFn python_batch_fn(py::object backend, std::string label) {
  auto holder = std::make_shared<GilObject>(std::move(backend));
  return [holder, label](const cc::Matrix& x, cc::Matrix& out) -> cc::Status {
    if (finalizing()) return {cc::ErrorCode::kUnavailable, "interpreter is shutting down"};
    py::gil_scoped_acquire gil;
    try {
      // A copy, not a view: a model may keep its input after returning.
      py::array_t<float> arr({static_cast<py::ssize_t>(x.rows), static_cast<py::ssize_t>(x.cols)});
      std::memcpy(arr.mutable_data(), x.data.data(), x.data.size() * sizeof(float));
      py::object r = holder->get().attr("infer")(arr);
      auto res = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(r);
      if (!res) {
        PyErr_Clear();
        return {cc::ErrorCode::kInternal, label + " returned a non-numeric result"};
      }
      std::size_t rows = 0;
      std::size_t cols = 0;
      if (res.ndim() == 2) {
        rows = static_cast<std::size_t>(res.shape(0));
        cols = static_cast<std::size_t>(res.shape(1));
      } else if (res.ndim() == 1) {
        rows = static_cast<std::size_t>(res.shape(0));
        cols = 1;
      } else {
        return {cc::ErrorCode::kInternal, label + " returned a " + std::to_string(res.ndim()) +
                                              "-D result; expected [n, k]"};
      }
      out.rows = rows;
      out.cols = cols;
      out.data.assign(res.data(), res.data() + rows * cols);
      return cc::Status::Ok();
    } catch (py::error_already_set& e) {
      return status_from_python(e, label);
    }
  };
}

// Starts an asynchronous native call (`start(callback)`) and waits for its callback's
// (Status, value) without the GIL: the work may run Python models or stores on native threads.
template <class Value, class Start>
std::pair<cc::Status, Value> await_native(Start&& start) {
  std::promise<std::pair<cc::Status, Value>> promise;
  auto future = promise.get_future();
  {
    py::gil_scoped_release nogil;
    start([&promise](cc::Status s, Value v) { promise.set_value({std::move(s), std::move(v)}); });
    future.wait();
  }
  return future.get();
}

std::vector<cc::OverrideInput> override_inputs(const py::object& overrides) {
  std::vector<cc::OverrideInput> out;
  if (overrides.is_none()) return out;
  for (auto item : py::cast<py::dict>(overrides)) {
    cc::OverrideInput o;
    o.name = std::string(str_view(item.first, "override name"));
    auto arr = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(item.second);
    if (!arr || arr.ndim() > 1) {
      PyErr_Clear();
      throw cc::Error(cc::ErrorCode::kInvalidArgument,
                      "override '" + o.name + "' must be a number or a 1-D array of numbers");
    }
    o.values.assign(arr.data(), arr.data() + arr.size());
    out.push_back(std::move(o));
  }
  return out;
}

cc::PredictCall make_call(const py::handle& model, const py::sequence& entity_ids,
                          const py::object& overrides, const py::object& request_id,
                          const std::string& version) {
  cc::PredictCall call;
  call.model = std::string(str_view(model, "model"));
  call.version = version;
  call.entity_ids.reserve(static_cast<std::size_t>(py::len(entity_ids)));
  for (py::handle h : entity_ids) call.entity_ids.emplace_back(str_view(h, "entity_id"));
  call.overrides = override_inputs(overrides);
  if (!request_id.is_none()) call.request_id = std::string(str_view(request_id, "request_id"));
  return call;
}

// (outputs [n, k] float32, variants, versions, degraded, latency_us, request_id)
py::tuple outcome_tuple(cc::PredictOutcome&& o) {
  const auto n = static_cast<py::ssize_t>(o.outputs.rows);
  py::array_t<float> outputs({n, static_cast<py::ssize_t>(o.outputs.cols)});
  if (!o.outputs.data.empty()) {
    std::memcpy(outputs.mutable_data(), o.outputs.data.data(), o.outputs.data.size() * sizeof(float));
  }
  std::vector<py::str> names;
  for (const cc::VariantId& v : o.variants) names.emplace_back(v.name);
  py::list variants(n);
  py::list versions(n);
  py::list degraded(n);
  for (py::ssize_t i = 0; i < n; ++i) {
    const auto vi = o.variant[static_cast<std::size_t>(i)];
    variants[i] = names[vi];
    versions[i] = py::int_(o.variants[vi].version);
    degraded[i] = py::bool_(o.degraded[static_cast<std::size_t>(i)] != 0);
  }
  return py::make_tuple(outputs, variants, versions, degraded, o.latency_us, o.request_id);
}

cc::VariantConfig variant_from_python(py::handle v) {
  cc::VariantConfig c;
  c.name = py::cast<std::string>(v.attr("name"));
  c.version = py::cast<std::uint32_t>(v.attr("version"));
  c.features = spec_from_python(v.attr("features"));
  c.timeout_ns = seconds_to_ns(py::cast<double>(v.attr("timeout_s")), "timeout_s");
  c.failure_threshold = py::cast<std::uint32_t>(v.attr("failure_threshold"));
  c.reset_after_ns = seconds_to_ns(py::cast<double>(v.attr("reset_after_s")), "reset_after_s");
  c.executor = py::cast<std::shared_ptr<cc::Executor>>(v.attr("executor"));
  return c;
}

py::tuple log_tuple(cc::LogBatch&& b) {
  auto matrix = [](const cc::Matrix& m) {
    py::array_t<float> a({static_cast<py::ssize_t>(m.rows), static_cast<py::ssize_t>(m.cols)});
    if (!m.data.empty()) std::memcpy(a.mutable_data(), m.data.data(), m.data.size() * sizeof(float));
    return a;
  };
  const auto m = static_cast<py::ssize_t>(b.entity_ids.size());
  const auto d = static_cast<py::ssize_t>(b.features.cols);
  py::array_t<bool> missing({m, d});
  if (!b.missing.empty() && static_cast<py::ssize_t>(b.missing.size()) == m * d) {
    std::memcpy(missing.mutable_data(), b.missing.data(), b.missing.size());
  } else if (m * d > 0) {
    std::memset(missing.mutable_data(), 0, static_cast<std::size_t>(m * d));
  }
  py::array_t<std::int64_t> rows(m);
  for (py::ssize_t i = 0; i < m; ++i) rows.mutable_data()[i] = b.rows[static_cast<std::size_t>(i)];
  py::list degraded(m);
  for (py::ssize_t i = 0; i < m; ++i) {
    degraded[i] = py::bool_(static_cast<std::size_t>(i) < b.degraded.size() &&
                            b.degraded[static_cast<std::size_t>(i)] != 0);
  }
  py::list columns;
  if (b.columns) {
    for (const std::string& c : *b.columns) columns.append(py::str(c));
  }
  return py::make_tuple(b.model, b.request_id, b.variant, b.version, columns,
                        py::cast(b.entity_ids), rows, matrix(b.features), missing,
                        matrix(b.outputs), degraded, b.latency_us, b.timestamp_ms, b.shadow);
}

class PyEngine {
 public:
  PyEngine(const PyFeatureCache& cache, std::optional<std::shared_ptr<cc::FeatureStore>> store,
           std::size_t max_in_flight, std::size_t max_batch, double store_deadline_s,
           double negative_ttl_s, std::size_t log_max_bytes, bool log_predictions) {
    cc::EngineOptions o;
    o.max_in_flight = max_in_flight;
    o.max_batch = max_batch;
    o.store_deadline_ns = seconds_to_ns(store_deadline_s, "store_deadline_s");
    o.negative_ttl_ns = seconds_to_ns(negative_ttl_s, "negative_ttl_s");
    o.log_max_bytes = log_max_bytes;
    o.log_predictions = log_predictions;
    engine_ = std::make_shared<cc::Engine>(o, cache.shared(), store.value_or(nullptr));
  }

  void deploy(const std::string& model, py::handle policy, const py::sequence& variants,
              std::size_t max_in_flight) {
    cc::ModelConfig config;
    config.model = model;
    config.policy = policy_from_python(policy);
    for (py::handle v : variants) config.variants.push_back(variant_from_python(v));
    config.max_in_flight = max_in_flight;
    // Warm-up runs Python models on batcher threads: they need the GIL we hold.
    py::gil_scoped_release nogil;
    engine_->deploy(std::move(config));
  }

  void undeploy(const std::string& model) {
    py::gil_scoped_release nogil;
    engine_->undeploy(model);
  }

  py::tuple predict(py::handle model, const py::sequence& entity_ids, const py::object& overrides,
                    const py::object& request_id, const std::string& version) {
    cc::PredictCall call = make_call(model, entity_ids, overrides, request_id, version);
    auto [status, outcome] = await_native<cc::PredictOutcome>(
        [&](cc::PredictDone done) { engine_->predict(std::move(call), std::move(done)); });
    if (!status.ok()) throw cc::Error(status.code, status.message);
    return outcome_tuple(std::move(outcome));
  }

  // callback(code, message, result_or_None), called once on a native thread with the GIL.
  void predict_async(py::handle model, const py::sequence& entity_ids, const py::object& overrides,
                     const py::object& request_id, const std::string& version,
                     py::object callback) {
    cc::PredictCall call = make_call(model, entity_ids, overrides, request_id, version);
    auto cb = std::make_shared<GilObject>(std::move(callback));
    py::gil_scoped_release nogil;
    engine_->predict(std::move(call), [cb](cc::Status s, cc::PredictOutcome o) {
      if (finalizing()) return;
      py::gil_scoped_acquire gil;
      try {
        if (s.ok()) {
          cb->get()(0, "", outcome_tuple(std::move(o)));
        } else {
          cb->get()(static_cast<int>(s.code), s.message, py::none());
        }
      } catch (py::error_already_set& e) {
        e.discard_as_unraisable("carrara predict callback");
      }
    });
  }

  py::object model_info(const std::string& name) const {
    std::optional<cc::ModelView> v = engine_->model(name);
    if (!v) return py::none();
    py::dict d;
    d["name"] = v->name;
    d["versions"] = v->versions;
    d["output_dim"] = v->output_dim;
    d["columns"] = v->columns;
    py::list variants;
    for (const cc::VariantId& id : v->variants) variants.append(py::make_tuple(id.name, id.version));
    d["variants"] = variants;
    return d;
  }

  py::list statistics(const std::string& name) const {
    py::list out;
    for (const cc::ModelStatsSnapshot& s : engine_->statistics(name)) {
      py::dict d;
      d["name"] = s.name;
      d["success_count"] = s.success_count;
      d["success_ns"] = s.success_ns;
      d["fail_count"] = s.fail_count;
      d["fail_ns"] = s.fail_ns;
      d["last_inference_ms"] = s.last_inference_ms;
      d["entities"] = s.entities;
      out.append(d);
    }
    return out;
  }

  py::dict metrics() const {
    cc::EngineMetrics m = engine_->metrics();
    py::dict d;
    py::list variants;
    for (const cc::VariantMetrics& v : m.variants) {
      py::list buckets;
      for (std::uint64_t b : v.buckets) buckets.append(b);
      variants.append(py::make_tuple(v.model, v.variant, v.version, v.requests, v.entities,
                                     v.latency_sum_s, buckets, v.errors, v.degraded));
    }
    d["variants"] = variants;
    py::list errors;
    for (const cc::ErrorCount& e : m.errors) {
      std::string code = cc::error_code_name(e.code);
      if (e.code == cc::ErrorCode::kDecode) code = "INVALID_ARGUMENT";
      errors.append(py::make_tuple(e.model, code, e.count));
    }
    d["errors"] = errors;
    py::list degraded;
    for (const auto& [model, count] : m.degraded) degraded.append(py::make_tuple(model, count));
    d["degraded"] = degraded;
    d["shed"] = m.shed;
    d["store_errors"] = m.store_errors;
    d["log_dropped"] = m.log_dropped;
    d["log_records"] = m.log_records;
    d["log_queued_bytes"] = m.log_queued_bytes;
    d["in_flight"] = m.in_flight;
    d["max_in_flight"] = m.max_in_flight;
    std::vector<double> bounds(cc::kLatencyBuckets.begin(), cc::kLatencyBuckets.end());
    d["buckets"] = bounds;
    return d;
  }

  py::object drain_log(std::size_t max_records, double wait_s) {
    std::vector<cc::LogBatch> batches;
    bool open = true;
    {
      py::gil_scoped_release nogil;
      open = engine_->drain_log(batches, max_records,
                                static_cast<std::int64_t>(std::max(0.0, wait_s) * kNsPerSecond));
    }
    if (!open) return py::none();
    py::list out;
    for (cc::LogBatch& b : batches) out.append(log_tuple(std::move(b)));
    return out;
  }

  bool wait_idle(double timeout_s) {
    py::gil_scoped_release nogil;
    return engine_->wait_idle(static_cast<std::int64_t>(std::max(0.0, timeout_s) * kNsPerSecond));
  }

  void close() {
    py::gil_scoped_release nogil;
    engine_->close();
  }

  const std::shared_ptr<cc::Engine>& native() const { return engine_; }

 private:
  std::shared_ptr<cc::Engine> engine_;
};

namespace cs = carrara::server;
}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "Carrara's native serving core (private: import carrara.core instead).";
  m.attr("__version__") = CARRARA_VERSION;
  py::register_exception_translator(&translate_error);

  py::dict codes;
  for (int c = 0; c < cc::kErrorCodeCount; ++c) {
    codes[cc::error_code_name(static_cast<cc::ErrorCode>(c))] = c;
  }
  m.attr("ERROR_CODES") = codes;
  m.def(
      "_raise_error",
      [](int code, const std::string& message) {
        throw cc::Error(static_cast<cc::ErrorCode>(code), message);
      },
      py::arg("code"), py::arg("message"), "Raise a core error with this code (for tests).");

  py::class_<cc::ManualClock, std::shared_ptr<cc::ManualClock>>(
      m, "ManualClock", "A clock that moves only when told to (for TTL tests).")
      .def(py::init([](double start) {
             return std::make_shared<cc::ManualClock>(static_cast<std::int64_t>(start * kNsPerSecond));
           }),
           py::arg("start_seconds") = 0.0)
      .def("now", [](const cc::ManualClock& c) { return static_cast<double>(c.now_ns()) / kNsPerSecond; })
      .def("set", [](cc::ManualClock& c, double s) { c.set_ns(static_cast<std::int64_t>(s * kNsPerSecond)); },
           py::arg("seconds"))
      .def("advance",
           [](cc::ManualClock& c, double s) { c.advance_ns(static_cast<std::int64_t>(s * kNsPerSecond)); },
           py::arg("seconds"));

  py::class_<cc::DecodedVector, MutableVectorPtr>(
      m, "FeatureVector", "One entity's values in one feature-group version (read-only).")
      .def(py::init(&make_vector), py::arg("entity_id"), py::arg("group"), py::arg("group_version"),
           py::arg("values"), py::arg("missing") = py::none(), py::arg("event_timestamp_us") = 0,
           py::arg("created_timestamp_us") = 0)
      .def_readonly("entity_id", &cc::DecodedVector::entity_id)
      .def_readonly("group", &cc::DecodedVector::group)
      .def_readonly("group_version", &cc::DecodedVector::group_version)
      .def_readonly("event_timestamp_us", &cc::DecodedVector::event_timestamp_us)
      .def_readonly("created_timestamp_us", &cc::DecodedVector::created_timestamp_us)
      .def_property_readonly("values", &values_array, "float32 values (a copy)")
      .def_property_readonly("missing", &missing_array, "bool mask, True = missing (a copy)")
      .def("__len__", [](const cc::DecodedVector& v) { return v.values.size(); })
      .def("encode",
           [](const cc::DecodedVector& v) {
             std::string s;
             {
               py::gil_scoped_release nogil;
               s = cc::encode_feature_vector(v);
             }
             return py::bytes(s);
           })
      .def_static(
          "decode",
          [](py::handle data) {
            std::string_view b = bytes_view(data, "data");
            auto v = std::make_shared<cc::DecodedVector>();
            {
              py::gil_scoped_release nogil;
              cc::decode_feature_vector(b, *v);
            }
            return v;
          },
          py::arg("data"))
      .def("__eq__",
           [](const cc::DecodedVector& a, py::handle other) {
             if (!py::isinstance<cc::DecodedVector>(other)) return false;
             const auto& b = other.cast<const cc::DecodedVector&>();
             return a.entity_id == b.entity_id && a.group == b.group &&
                    a.group_version == b.group_version &&
                    a.event_timestamp_us == b.event_timestamp_us &&
                    a.created_timestamp_us == b.created_timestamp_us && a.missing == b.missing &&
                    a.values.size() == b.values.size() &&
                    std::memcmp(a.values.data(), b.values.data(), a.values.size() * sizeof(float)) == 0;
           })
      .def("__repr__", [](const cc::DecodedVector& v) {
        return "FeatureVector(entity_id='" + v.entity_id + "', group='" + v.group + "', version=" +
               std::to_string(v.group_version) + ", values=" + std::to_string(v.values.size()) + ")";
      });
  m.attr("FeatureVector").attr("__hash__") = py::none();

  py::class_<PyFeatureCache>(m, "FeatureCache",
                             "Sharded LRU cache of decoded feature vectors with per-entry TTL.")
      .def(py::init<std::size_t, double, std::size_t,
                    std::optional<std::shared_ptr<cc::ManualClock>>>(),
           py::arg("capacity") = 10'000, py::arg("ttl_seconds") = 30.0, py::arg("shards") = 16,
           py::arg("clock") = py::none())
      .def("put", &PyFeatureCache::put, py::arg("key"), py::arg("value"),
           py::arg("ttl_seconds") = py::none())
      .def("put_many", &PyFeatureCache::put_many, py::arg("keys"), py::arg("values"),
           py::arg("ttl_seconds") = py::none())
      .def("get", &PyFeatureCache::get, py::arg("key"))
      .def("get_many", &PyFeatureCache::get_many, py::arg("keys"))
      .def("erase", &PyFeatureCache::erase, py::arg("key"))
      .def("clear", &PyFeatureCache::clear)
      .def("purge_expired", &PyFeatureCache::purge_expired)
      .def("stats", &PyFeatureCache::stats)
      .def("keys_by_recency",
           [](const PyFeatureCache& c, std::size_t shard) { return c.native().keys_by_recency(shard); },
           py::arg("shard") = 0)
      .def("__contains__", &PyFeatureCache::contains, py::arg("key"))
      .def("__len__", &PyFeatureCache::size)
      .def_property_readonly("capacity", [](const PyFeatureCache& c) { return c.native().capacity(); })
      .def_property_readonly("shards", [](const PyFeatureCache& c) { return c.native().shard_count(); })
      .def_property_readonly("ttl_seconds", [](const PyFeatureCache& c) {
        return static_cast<double>(c.native().default_ttl_ns()) / kNsPerSecond;
      });

  py::class_<PyPlan>(m, "Plan", "Cache lookups for one batch: hits kept, misses to fetch.")
      .def_property_readonly("size", [](const PyPlan& p) { return p.plan.n; })
      .def_property_readonly("missing_keys", [](const PyPlan& p) { return p.plan.miss_keys; });

  py::class_<cc::Assembler>(m, "Assembler",
                            "Feature vectors of several groups -> one float32 [n, d] tensor.")
      .def(py::init([](py::handle spec) { return std::make_unique<cc::Assembler>(spec_from_python(spec)); }),
           py::arg("spec"))
      .def_property_readonly("dim", &cc::Assembler::dim)
      .def_property_readonly("group_count", &cc::Assembler::group_count)
      .def_property_readonly("column_names", &cc::Assembler::column_names)
      .def("column_index", &cc::Assembler::column_index, py::arg("name"))
      .def("key", [](const cc::Assembler& a, std::size_t group, py::handle entity) {
             if (group >= a.group_count()) {
               throw cc::Error(cc::ErrorCode::kInvalidArgument, "no group " + std::to_string(group));
             }
             return a.key(group, str_view(entity, "entity_id"));
           }, py::arg("group"), py::arg("entity_id"))
      .def("assemble", &assemble_vectors, py::arg("vectors"), py::arg("overrides") = py::none(),
           "vectors: one list per group of bytes | FeatureVector | None per entity.")
      .def("plan",
           [](const cc::Assembler& a, PyFeatureCache& cache, const py::sequence& entity_ids) {
             std::vector<std::string_view> ids = str_views(entity_ids, "entity_id");
             auto p = std::make_unique<PyPlan>();
             py::gil_scoped_release nogil;
             p->plan = a.plan(cache.native(), ids);
             return p;
           },
           py::arg("cache"), py::arg("entity_ids"))
      .def("fill",
           [](const cc::Assembler& a, PyPlan& p, const py::sequence& values,
              std::optional<PyFeatureCache*> cache) {
             std::vector<std::optional<std::string_view>> vs;
             vs.reserve(static_cast<std::size_t>(py::len(values)));
             for (py::handle h : values) {
               if (h.is_none()) {
                 vs.emplace_back(std::nullopt);
               } else {
                 vs.emplace_back(bytes_view(h, "online-store value"));
               }
             }
             py::gil_scoped_release nogil;
             PyFeatureCache* c = cache.value_or(nullptr);
             a.fill(p.plan, vs, c == nullptr ? nullptr : &c->native());
           },
           py::arg("plan"), py::arg("values"), py::arg("cache") = py::none())
      .def("assemble_plan",
           [](const cc::Assembler& a, const PyPlan& p, const py::object& overrides) {
             std::vector<cc::Override> ov = overrides_from_python(a, overrides);
             return run_assembly(a, p.plan.n, ov,
                                 [&](float* o, std::uint8_t* m) { a.assemble(p.plan, o, m); });
           },
           py::arg("plan"), py::arg("overrides") = py::none());

  py::class_<cc::Router>(m, "Router", "Deterministic, sticky split of entities over variants.")
      .def(py::init([](py::handle policy) { return std::make_unique<cc::Router>(policy_from_python(policy)); }),
           py::arg("policy"))
      .def("route", [](const cc::Router& r, py::handle id) { return r.route(str_view(id, "entity_id")); },
           py::arg("entity_id"))
      .def("route_name",
           [](const cc::Router& r, py::handle id) {
             return r.variants()[r.route(str_view(id, "entity_id"))].name;
           },
           py::arg("entity_id"))
      .def("bucket", [](const cc::Router& r, py::handle id) { return r.bucket(str_view(id, "entity_id")); },
           py::arg("entity_id"))
      .def("route_many",
           [](const cc::Router& r, const py::sequence& ids) {
             std::vector<std::string_view> v = str_views(ids, "entity_id");
             py::array_t<std::uint32_t> out(static_cast<py::ssize_t>(v.size()));
             std::uint32_t* o = out.mutable_data();
             {
               py::gil_scoped_release nogil;
               r.route_many(v, o);
             }
             return out;
           },
           py::arg("entity_ids"))
      .def_property_readonly("variant_names",
                             [](const cc::Router& r) {
                               std::vector<std::string> names;
                               for (const auto& v : r.variants()) names.push_back(v.name);
                               return names;
                             })
      .def_property_readonly("shadows", [](const cc::Router& r) { return r.policy().shadows; })
      .def_property_readonly("fallback_index", [](const cc::Router& r) -> std::optional<int> {
        if (r.fallback_index() < 0) return std::nullopt;
        return r.fallback_index();
      });


  // --- serving engine ----------------------------------------------------------------------
  py::class_<cc::FeatureStore, std::shared_ptr<cc::FeatureStore>>(
      m, "FeatureStore", "An online store the native engine reads from.");
  py::class_<PythonStore, cc::FeatureStore, std::shared_ptr<PythonStore>>(
      m, "PythonStore", "A Python online store (an object with mget(keys) -> list[bytes | None]).")
      .def(py::init<py::object>(), py::arg("reader"));
  py::class_<cc::RedisStore, cc::FeatureStore, std::shared_ptr<cc::RedisStore>>(
      m, "RedisStore", "Redis read natively (hiredis): pooled, pipelined MGET with a deadline.")
      .def(py::init([](const std::string& url, const std::string& key_prefix,
                       double connect_timeout_s, double down_backoff_s) {
             cc::RedisStoreOptions o;
             o.connect_timeout_ns = seconds_to_ns(connect_timeout_s, "connect_timeout_s");
             o.down_backoff_ns = seconds_to_ns(down_backoff_s, "down_backoff_s");
             o.client_name = "carrara-gateway";
             return std::make_shared<cc::RedisStore>(url, key_prefix, o);
           }),
           py::arg("url"), py::arg("key_prefix") = "", py::arg("connect_timeout_s") = 0.2,
           py::arg("down_backoff_s") = 0.25)
      .def("mget",
           [](cc::RedisStore& r, const std::vector<std::string>& keys, double timeout_s) {
             std::vector<std::optional<std::string>> out;
             {
               py::gil_scoped_release nogil;
               r.mget(keys, out, cc::steady_now_ns() + seconds_to_ns(timeout_s, "timeout_s"));
             }
             py::list values(out.size());
             for (std::size_t i = 0; i < out.size(); ++i) {
               if (out[i]) values[i] = py::bytes(*out[i]);
               else values[i] = py::none();
             }
             return values;
           },
           py::arg("keys"), py::arg("timeout_s") = 0.05)
      .def("ping",
           [](cc::RedisStore& r, double timeout_s) {
             py::gil_scoped_release nogil;
             r.ping(cc::steady_now_ns() + seconds_to_ns(timeout_s, "timeout_s"));
           },
           py::arg("timeout_s") = 1.0,
           "One PING round trip (opens a pooled connection); raises when Redis does not answer.")
      .def("stats", [](const cc::RedisStore& r) {
        cc::RedisStoreStats s = r.stats();
        py::dict d;
        d["calls"] = s.calls;
        d["failures"] = s.failures;
        d["timeouts"] = s.timeouts;
        d["fast_failures"] = s.fast_failures;
        d["connects"] = s.connects;
        d["connections_open"] = s.connections_open;
        return d;
      });

  py::class_<cc::Executor, std::shared_ptr<cc::Executor>>(
      m, "Executor", "Where a variant's assembled features become predictions.")
      .def_property_readonly("input_dim", &cc::Executor::input_dim)
      .def_property_readonly("output_dim", &cc::Executor::output_dim)
      .def_property_readonly("in_process", &cc::Executor::in_process)
      .def("close", &cc::Executor::close, py::call_guard<py::gil_scoped_release>());
  py::class_<cc::DynamicBatcher, cc::Executor, std::shared_ptr<cc::DynamicBatcher>>(
      m, "PythonExecutor",
      "Dynamic batcher over a Python model: backend.infer(x) once per batch (one GIL take).")
      .def(py::init([](py::object backend, std::size_t input_dim, std::size_t output_dim,
                       std::size_t max_batch_size, double max_queue_delay_us, std::size_t workers,
                       bool in_process, std::size_t max_queued_rows, const std::string& label) {
             cc::BatcherOptions o;
             o.max_batch_size = max_batch_size;
             o.max_queue_delay_ns = static_cast<std::int64_t>(max_queue_delay_us * 1000.0);
             o.workers = workers;
             o.in_process = in_process;
             o.max_queued_rows = max_queued_rows;
             return std::make_shared<cc::DynamicBatcher>(
                 input_dim, output_dim, python_batch_fn(std::move(backend), label), o);
           }),
           py::arg("backend"), py::arg("input_dim"), py::arg("output_dim"),
           py::arg("max_batch_size") = 64, py::arg("max_queue_delay_us") = 0.0,
           py::arg("workers") = 1, py::arg("in_process") = true,
           py::arg("max_queued_rows") = 1 << 16, py::arg("label") = "model")
      .def("stats", [](const cc::DynamicBatcher& b) {
        cc::BatcherStats s = b.stats();
        py::dict d;
        d["batches"] = s.batches;
        d["requests"] = s.requests;
        d["rows"] = s.rows;
        d["queued_rows"] = s.queued_rows;
        return d;
      });

  py::class_<PyEngine>(m, "Engine",
                       "The native serving path: admission, routing, cache, store, batching.")
      .def(py::init<const PyFeatureCache&, std::optional<std::shared_ptr<cc::FeatureStore>>,
                    std::size_t, std::size_t, double, double, std::size_t, bool>(),
           py::arg("cache"), py::arg("store") = py::none(), py::arg("max_in_flight") = 256,
           py::arg("max_batch") = 1000, py::arg("store_deadline_s") = 0.05,
           py::arg("negative_ttl_s") = 5.0, py::arg("log_max_bytes") = 64u << 20,
           py::arg("log_predictions") = false)
      .def("deploy", &PyEngine::deploy, py::arg("model"), py::arg("policy"), py::arg("variants"),
           py::arg("max_in_flight") = 0)
      .def("undeploy", &PyEngine::undeploy, py::arg("model"))
      .def("predict", &PyEngine::predict, py::arg("model"), py::arg("entity_ids"),
           py::arg("overrides") = py::none(), py::arg("request_id") = py::none(),
           py::arg("version") = "")
      .def("predict_async", &PyEngine::predict_async, py::arg("model"), py::arg("entity_ids"),
           py::arg("overrides"), py::arg("request_id"), py::arg("version"), py::arg("callback"))
      .def("models", [](const PyEngine& e) { return e.native()->models(); })
      .def("model_info", &PyEngine::model_info, py::arg("name"))
      .def_property_readonly("ready", [](const PyEngine& e) { return e.native()->ready(); })
      .def_property_readonly("draining", [](const PyEngine& e) { return e.native()->draining(); })
      .def("set_draining", [](PyEngine& e, bool d) { e.native()->set_draining(d); }, py::arg("draining"))
      .def_property_readonly("in_flight", [](const PyEngine& e) { return e.native()->in_flight(); })
      .def("wait_idle", &PyEngine::wait_idle, py::arg("timeout_s"))
      .def("statistics", &PyEngine::statistics, py::arg("name") = "")
      .def("metrics", &PyEngine::metrics)
      .def("drain_log", &PyEngine::drain_log, py::arg("max_records") = 500, py::arg("wait_s") = 0.05)
      .def("close_log", [](PyEngine& e) { e.native()->close_log(); })
      .def("close", &PyEngine::close);

  py::class_<cs::TritonExecutor, cc::Executor, std::shared_ptr<cs::TritonExecutor>>(
      m, "TritonExecutor", "A model on a Triton server, called over native gRPC (KServe v2).")
      .def(py::init([](const std::string& url, const std::string& model,
                       const std::string& model_version, const std::string& output,
                       double timeout_s, double connect_timeout_s) {
             cs::TritonOptions o;
             o.url = url;
             o.model = model;
             o.model_version = model_version;
             o.output = output;
             o.timeout_ns = seconds_to_ns(timeout_s, "timeout_s");
             o.connect_timeout_ns = seconds_to_ns(connect_timeout_s, "connect_timeout_s");
             py::gil_scoped_release nogil;
             return std::make_shared<cs::TritonExecutor>(o);
           }),
           py::arg("url"), py::arg("model"), py::arg("model_version") = "",
           py::arg("output") = "", py::arg("timeout_s") = 1.0, py::arg("connect_timeout_s") = 5.0)
      .def_property_readonly("input_name", &cs::TritonExecutor::input_name)
      .def_property_readonly("output_name", &cs::TritonExecutor::output_name)
      .def_property_readonly("platform", &cs::TritonExecutor::platform)
      .def("infer",
           [](cs::TritonExecutor& t,
              const py::array_t<float, py::array::c_style | py::array::forcecast>& x) {
             if (x.ndim() != 2) {
               throw cc::Error(cc::ErrorCode::kInvalidArgument, "x must be [n, d]");
             }
             cc::Matrix in(static_cast<std::size_t>(x.shape(0)), static_cast<std::size_t>(x.shape(1)));
             std::memcpy(in.data.data(), x.data(), in.data.size() * sizeof(float));
             auto [status, y] = await_native<cc::Matrix>(
                 [&](cc::InferDone done) { t.infer(std::move(in), std::move(done)); });
             if (!status.ok()) throw cc::Error(status.code, status.message);
             py::array_t<float> out({static_cast<py::ssize_t>(y.rows), static_cast<py::ssize_t>(y.cols)});
             if (!y.data.empty()) std::memcpy(out.mutable_data(), y.data.data(), y.data.size() * sizeof(float));
             return out;
           },
           py::arg("x"), "One synchronous call (tests and checks; the engine calls it natively).");

  py::class_<cs::GrpcServer>(m, "GrpcServer",
                             "The native gRPC front: carrara.v1.Predict, KServe v2, health.")
      .def(py::init([](const PyEngine& engine, const std::string& host, int port,
                       std::size_t max_message_bytes, const std::string& version,
                       std::vector<std::string> auth_tokens, std::string tls_cert_chain,
                       std::string tls_private_key, std::string tls_client_ca) {
             cs::ServerOptions o;
             o.host = host;
             o.port = port;
             o.max_message_bytes = max_message_bytes;
             o.server_version = version;
             o.auth_tokens = std::move(auth_tokens);
             o.tls_cert_chain = std::move(tls_cert_chain);
             o.tls_private_key = std::move(tls_private_key);
             o.tls_client_ca = std::move(tls_client_ca);
             py::gil_scoped_release nogil;
             return std::make_unique<cs::GrpcServer>(engine.native(), std::move(o));
           }),
           py::arg("engine"), py::arg("host") = "127.0.0.1", py::arg("port") = 0,
           py::arg("max_message_bytes") = 16u << 20, py::arg("version") = CARRARA_VERSION,
           py::arg("auth_tokens") = std::vector<std::string>{}, py::arg("tls_cert_chain") = "",
           py::arg("tls_private_key") = "", py::arg("tls_client_ca") = "",
           "Serves until shutdown(). Off by default: with auth_tokens, every call but "
           "grpc.health.v1 needs metadata 'authorization: Bearer <token>' (else "
           "UNAUTHENTICATED); tls_cert_chain/tls_private_key (PEM contents, not paths) make the "
           "port TLS-only; tls_client_ca (PEM) also requires client certificates it signed.")
      .def_property_readonly("port", &cs::GrpcServer::port)
      .def("set_serving", &cs::GrpcServer::set_serving, py::arg("serving"),
           py::call_guard<py::gil_scoped_release>())
      .def("shutdown",
           [](cs::GrpcServer& s, double grace_s) {
             py::gil_scoped_release nogil;
             s.shutdown(static_cast<std::int64_t>(std::max(0.0, grace_s) * kNsPerSecond));
           },
           py::arg("grace_s") = 5.0);
  m.def("stable_hash", [](py::handle salt, py::handle id) {
    return cc::stable_hash(str_view(salt, "salt"), str_view(id, "entity_id"));
  }, py::arg("salt"), py::arg("entity_id"), "The router's stable 64-bit hash of salt + id.");
}
