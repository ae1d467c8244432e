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

#include "carrara/core/assembler.hpp"
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

  m.def("stable_hash", [](py::handle salt, py::handle id) {
    return cc::stable_hash(str_view(salt, "salt"), str_view(id, "entity_id"));
  }, py::arg("salt"), py::arg("entity_id"), "The router's stable 64-bit hash of salt + id.");
}
