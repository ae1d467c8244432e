"""Reference profiles: a compact sketch of the training data per feature and of the model's
output, built at registration and stored with the version (model name, version number).

Numeric features keep a fixed-bin histogram whose edges are the reference's own quantiles
(``n_bins`` equal-mass bins, 100 by default) plus min/max/mean/std and the missing count.
Windows of live traffic are binned on the same edges, so every drift statistic compares two
histograms on one grid. PSI uses ~10 coarse groups of those fine bins (equal reference mass);
KS uses the fine bins (see :mod:`carrara.monitoring.drift` for its error bound).
Categorical features keep the ``max_categories`` most frequent values and one "other" count.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import msgspec
import numpy as np
from numpy.typing import ArrayLike, NDArray

from carrara.errors import InvalidArgumentError, NotFoundError
from carrara.sql import Database

from .schema import ensure_schema

__all__ = [
    "PREDICTION",
    "CategoricalSketch",
    "FeatureProfile",
    "NumericSketch",
    "ReferenceProfile",
    "build_profile",
    "category_key",
    "list_profiles",
    "load_profile",
    "prediction_value",
    "profile_feature",
    "store_profile",
]

#: The name under which the model's output is profiled and checked like a feature.
PREDICTION = "__prediction__"
OTHER = "__other__"


class NumericSketch(msgspec.Struct, frozen=True, kw_only=True):
    """Histogram on the reference's quantile edges: bin i holds edges[i-1] < x <= edges[i]
    (the first and last bins are open), so the CDF at ``edges[i]`` is ``sum(counts[:i+1])``."""

    edges: list[float]
    counts: list[int]  # len(edges) + 1
    psi_cuts: list[int]  # first fine bin of each coarse PSI group after the first
    min: float
    max: float
    mean: float
    std: float


class CategoricalSketch(msgspec.Struct, frozen=True, kw_only=True):
    """Frequencies of the most common values; ``counts[-1]`` counts every other value."""

    categories: list[str]
    counts: list[int]  # len(categories) + 1


class FeatureProfile(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    kind: Literal["numeric", "categorical"]
    count: int  # non-missing values
    missing: int
    numeric: NumericSketch | None = None
    categorical: CategoricalSketch | None = None

    @property
    def missing_rate(self) -> float:
        total = self.count + self.missing
        return self.missing / total if total else 0.0

    @property
    def n_bins(self) -> int:
        if self.numeric is not None:
            return len(self.numeric.counts)
        assert self.categorical is not None
        return len(self.categorical.counts)

    def reference_counts(self) -> NDArray[np.int64]:
        sketch = self.numeric if self.numeric is not None else self.categorical
        assert sketch is not None
        return np.asarray(sketch.counts, dtype=np.int64)


class ReferenceProfile(msgspec.Struct, frozen=True, kw_only=True):
    """The training data of one model version as monitoring compares live traffic to it."""

    model: str
    version: int
    rows: int
    features: list[FeatureProfile]
    prediction: FeatureProfile | None = None
    baseline: dict[str, float] = {}  # the registry's evaluation metrics, e.g. {"auc": 0.91}
    created_ms: int = 0

    def feature(self, name: str) -> FeatureProfile:
        for f in self.checked():
            if f.name == name:
                return f
        known = ", ".join(f.name for f in self.checked())
        raise NotFoundError(
            f"profile of {self.model} v{self.version} has no {name!r}; known: {known}"
        )

    def checked(self) -> list[FeatureProfile]:
        """Features, then the prediction: everything drift is computed for."""
        return [*self.features, *([self.prediction] if self.prediction is not None else [])]


def category_key(value: object) -> str:
    """The one spelling of a categorical value shared by training frames and logged floats:
    integral numbers as integers ("3", not "3.0"), booleans as "0"/"1", strings unchanged."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | np.bool_):
        return "1" if value else "0"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        f = float(value)
        return str(int(f)) if f.is_integer() else repr(f)
    return str(value)


def prediction_value(prediction: Sequence[float]) -> float:
    """The scalar monitored for one model output row: the value of a single output, the
    positive-class probability of two, the predicted class index of more."""
    n = len(prediction)
    if n == 1:
        return float(prediction[0])
    if n == 2:
        return float(prediction[1])
    if n == 0:
        return float("nan")
    return float(max(range(n), key=prediction.__getitem__))


def _is_missing(values: NDArray[Any]) -> NDArray[np.bool_]:
    if values.dtype.kind == "f":
        return np.asarray(np.isnan(values), dtype=bool)
    if values.dtype.kind == "O":
        out = np.zeros(len(values), dtype=bool)
        for i, v in enumerate(values):
            out[i] = v is None or (isinstance(v, float) and v != v)
        return out
    return np.zeros(len(values), dtype=bool)


def profile_feature(
    name: str,
    values: ArrayLike,
    *,
    categorical: bool = False,
    n_bins: int = 100,
    psi_bins: int = 10,
    max_categories: int = 50,
) -> FeatureProfile:
    """Profile one column of reference data (NaN/None are missing)."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise InvalidArgumentError(f"feature {name!r}: expected a 1-D column, got {arr.shape}")
    missing_mask = _is_missing(arr)
    present = arr[~missing_mask]
    missing = int(missing_mask.sum())
    if categorical:
        keys = [category_key(v) for v in present.tolist()]
        uniq, counts = np.unique(np.asarray(keys, dtype=object), return_counts=True)
        order = sorted(range(len(uniq)), key=lambda i: (-int(counts[i]), str(uniq[i])))
        top = order[:max_categories]
        cats = [str(uniq[i]) for i in top]
        top_counts = [int(counts[i]) for i in top]
        other = int(counts.sum()) - sum(top_counts)
        return FeatureProfile(
            name=name,
            kind="categorical",
            count=len(keys),
            missing=missing,
            categorical=CategoricalSketch(categories=cats, counts=[*top_counts, other]),
        )
    try:
        x = present.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(
            f"feature {name!r} is not numeric ({arr.dtype}); pass it in categorical=[...]"
        ) from exc
    if n_bins < 2 or psi_bins < 2:
        raise InvalidArgumentError(f"need n_bins >= 2 and psi_bins >= 2, got {n_bins}, {psi_bins}")
    if len(x):
        edges = np.unique(np.quantile(x, np.linspace(0.0, 1.0, n_bins + 1)[1:-1]))
    else:
        edges = np.zeros(0)
    counts = np.bincount(np.searchsorted(edges, x, side="left"), minlength=len(edges) + 1)
    return FeatureProfile(
        name=name,
        kind="numeric",
        count=len(x),
        missing=missing,
        numeric=NumericSketch(
            edges=edges.tolist(),
            counts=counts.tolist(),
            psi_cuts=_psi_cuts(counts, psi_bins),
            min=float(x.min()) if len(x) else 0.0,
            max=float(x.max()) if len(x) else 0.0,
            mean=float(x.mean()) if len(x) else 0.0,
            std=float(x.std()) if len(x) else 0.0,
        ),
    )


def _psi_cuts(counts: NDArray[np.int64], groups: int) -> list[int]:
    """Group fine bins into ~``groups`` bins of equal reference mass (PSI is noisy on many
    thin bins: its expectation on unchanged data grows with the number of bins / n)."""
    total = counts.sum()
    if total == 0:
        return []
    cum = np.cumsum(counts) / total
    cuts: list[int] = []
    for g in range(1, groups):
        i = int(np.searchsorted(cum, g / groups - 1e-12, side="left")) + 1
        if 0 < i < len(counts) and (not cuts or i > cuts[-1]):
            cuts.append(i)
    return cuts


def _columns(
    frame: Any, feature_names: Sequence[str] | None
) -> tuple[list[str], dict[str, NDArray[Any]], set[str]]:
    """Columns of a pandas/polars frame, a mapping of arrays, or a 2-D array with names; and
    the columns whose dtype says they are categorical."""
    implied: set[str] = set()
    if hasattr(frame, "columns") and hasattr(frame, "dtypes") and not isinstance(frame, np.ndarray):
        names = [str(c) for c in frame.columns]
        cols: dict[str, NDArray[Any]] = {}
        for name, original in zip(names, frame.columns, strict=True):
            series = frame[original]
            dtype = str(series.dtype).lower()
            if any(k in dtype for k in ("object", "category", "bool", "str", "utf8", "enum")):
                implied.add(name)
            to_numpy = getattr(series, "to_numpy", None)
            cols[name] = np.asarray(to_numpy() if to_numpy is not None else series)
            if name in implied and cols[name].dtype.kind not in "OUb":
                cols[name] = cols[name].astype(object)
        return names, cols, implied
    if isinstance(frame, Mapping):
        names = [str(k) for k in frame]
        cols = {str(k): np.asarray(v) for k, v in frame.items()}
        implied = {n for n, c in cols.items() if c.dtype.kind in "OUb"}
        return names, cols, implied
    arr = np.asarray(frame)
    if arr.ndim != 2:
        raise InvalidArgumentError(f"expected a frame or a 2-D array, got shape {arr.shape}")
    if feature_names is None or len(feature_names) != arr.shape[1]:
        raise InvalidArgumentError(
            f"a 2-D array needs feature_names with {arr.shape[1]} names, got {feature_names!r}"
        )
    names = list(feature_names)
    return names, {n: arr[:, i] for i, n in enumerate(names)}, set()


def build_profile(
    frame: Any,
    outputs: ArrayLike | None = None,
    *,
    model: str,
    version: int,
    baseline: Mapping[str, float] | None = None,
    categorical: Sequence[str] = (),
    feature_names: Sequence[str] | None = None,
    n_bins: int = 100,
    psi_bins: int = 10,
    max_categories: int = 50,
) -> ReferenceProfile:
    """Profile training data (a pandas/polars frame, a mapping of columns, or a 2-D array with
    ``feature_names``) and the model's outputs on it (shape [n], [n, 1], or [n, k]).

    Columns of object/category/bool dtype and those named in ``categorical`` are profiled as
    categories; the rest as numbers. ``baseline`` holds the registry's evaluation metrics.
    """
    names, cols, implied = _columns(frame, feature_names)
    unknown = sorted(set(categorical) - set(names))
    if unknown:
        raise InvalidArgumentError(f"categorical names {unknown} are not columns; known: {names}")
    if PREDICTION in names:
        raise InvalidArgumentError(f"{PREDICTION!r} is reserved for the model output")
    rows = len(next(iter(cols.values()))) if cols else 0

    def one(name: str, values: ArrayLike, is_categorical: bool = False) -> FeatureProfile:
        return profile_feature(
            name,
            values,
            categorical=is_categorical,
            n_bins=n_bins,
            psi_bins=psi_bins,
            max_categories=max_categories,
        )

    features = [one(n, cols[n], n in implied or n in categorical) for n in names]
    prediction = None
    if outputs is not None:
        out = np.asarray(outputs, dtype=np.float64)
        if out.ndim == 2 and out.shape[1] == 1:
            out = out[:, 0]
        if out.ndim == 1:
            prediction = one(PREDICTION, out)
        elif out.ndim == 2 and out.shape[1] == 2:
            prediction = one(PREDICTION, out[:, 1])
        elif out.ndim == 2:
            classes = np.argmax(out, axis=1)
            prediction = one(PREDICTION, classes, True)
        else:
            raise InvalidArgumentError(f"outputs must be [n] or [n, k], got shape {out.shape}")
        if rows and len(out) != rows:
            raise InvalidArgumentError(f"outputs have {len(out)} rows, the frame has {rows}")
    return ReferenceProfile(
        model=model,
        version=version,
        rows=rows,
        features=features,
        prediction=prediction,
        baseline=dict(baseline or {}),
        created_ms=time.time_ns() // 1_000_000,
    )


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ReferenceProfile)


def store_profile(db: Database, profile: ReferenceProfile) -> None:
    """Store (or replace) the profile of (model, version)."""
    ensure_schema(db)
    blob = _encoder.encode(profile)
    with db.transaction() as tx:
        tx.execute(
            "DELETE FROM monitoring_profiles WHERE model = ? AND version = ?",
            (profile.model, profile.version),
        )
        tx.execute(
            "INSERT INTO monitoring_profiles (model, version, created_ms, profile)"
            " VALUES (?, ?, ?, ?)",
            (profile.model, profile.version, profile.created_ms, blob),
        )


def load_profile(db: Database, model: str, version: int | None = None) -> ReferenceProfile:
    """The stored profile of ``model`` at ``version`` (the newest version when None)."""
    ensure_schema(db)
    with db.transaction() as tx:
        if version is None:
            row = tx.fetchone(
                "SELECT profile FROM monitoring_profiles WHERE model = ?"
                " ORDER BY version DESC LIMIT 1",
                (model,),
            )
        else:
            row = tx.fetchone(
                "SELECT profile FROM monitoring_profiles WHERE model = ? AND version = ?",
                (model, version),
            )
    if row is None:
        known = [f"{m} v{v}" for m, v in list_profiles(db)]
        what = model if version is None else f"{model} v{version}"
        raise NotFoundError(f"no reference profile for {what}; profiled: {known or 'none'}")
    return _decoder.decode(bytes(row[0]))


def list_profiles(db: Database, model: str | None = None) -> list[tuple[str, int]]:
    """(model, version) of every stored profile, optionally of one model."""
    ensure_schema(db)
    with db.transaction() as tx:
        if model is None:
            rows = tx.fetchall("SELECT model, version FROM monitoring_profiles ORDER BY 1, 2")
        else:
            rows = tx.fetchall(
                "SELECT model, version FROM monitoring_profiles WHERE model = ? ORDER BY 2",
                (model,),
            )
    return [(str(m), int(v)) for m, v in rows]
