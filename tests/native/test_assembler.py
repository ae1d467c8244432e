"""Assembler: decoded vectors of several groups -> float32 [n, d], against a numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from carrara.core import (
    Assembler,
    AssemblerSpec,
    FeatureCache,
    FeatureRef,
    FeatureVector,
    GroupSchema,
    encode_feature_vector,
)
from carrara.errors import DecodeError, InvalidArgumentError

GROUPS = (
    GroupSchema("trips", 2, ("count", "fare_mean", "fare_p50", "dist")),
    GroupSchema("driver", 1, ("rating", "age", "count")),
    GroupSchema("geo", 5, tuple(f"g{i}" for i in range(10))),
)


def random_spec(rng: np.random.Generator) -> AssemblerSpec:
    refs = [FeatureRef(g.name, f, float(rng.normal())) for g in GROUPS for f in g.features]
    order = rng.permutation(len(refs))[: int(rng.integers(1, len(refs) + 1))]
    return AssemblerSpec(groups=GROUPS, features=tuple(refs[i] for i in order))


def reference(
    spec: AssemblerSpec,
    values: dict[tuple[int, int], tuple[NDArray[np.float32], NDArray[np.bool_]]],
    n: int,
) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Plain numpy: for each column, the group vector's value, else the default."""
    index = {g.name: gi for gi, g in enumerate(spec.groups)}
    out = np.zeros((n, len(spec.features)), np.float32)
    mask = np.zeros((n, len(spec.features)), bool)
    for c, ref in enumerate(spec.features):
        gi = index[ref.group]
        src = spec.groups[gi].features.index(ref.feature)
        for i in range(n):
            row = values.get((gi, i))
            if row is not None and src < len(row[0]) and not row[1][src]:
                out[i, c] = row[0][src]
            else:
                out[i, c] = np.float32(ref.default)
                mask[i, c] = True
    return out, mask


@pytest.mark.parametrize("seed", range(20))
def test_assemble_matches_numpy_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    spec = random_spec(rng)
    assembler = Assembler(spec)
    n = int(rng.integers(1, 40))
    values: dict[tuple[int, int], tuple[NDArray[np.float32], NDArray[np.bool_]]] = {}
    per_group: list[list[bytes | FeatureVector | None]] = []
    for gi, g in enumerate(GROUPS):
        column: list[bytes | FeatureVector | None] = []
        for i in range(n):
            if rng.random() < 0.15:  # entity has no row in this group
                column.append(None)
                continue
            width = len(g.features) - int(rng.integers(0, 2))  # sometimes a short vector
            vals = rng.normal(size=width).astype(np.float32)
            miss = rng.random(width) < 0.2
            values[(gi, i)] = (vals, miss)
            fv = FeatureVector(f"e{i}", g.name, g.version, vals, miss)
            column.append(fv if rng.random() < 0.5 else fv.encode())
        per_group.append(column)
    x, mask = assembler.assemble(per_group)
    ex, emask = reference(spec, values, n)
    assert x.dtype == np.float32 and x.shape == (n, assembler.dim) and x.flags.c_contiguous
    np.testing.assert_array_equal(x, ex)
    np.testing.assert_array_equal(mask, emask)


def test_column_names_and_indices() -> None:
    spec = AssemblerSpec(
        groups=GROUPS,
        features=(
            FeatureRef("trips", "count"),
            FeatureRef("driver", "count"),
            FeatureRef("trips", "fare_mean"),
        ),
    )
    a = Assembler(spec)
    assert a.column_names == ["trips.count", "driver.count", "fare_mean"]
    assert a.column_index("fare_mean") == 2
    assert a.column_index("trips.fare_mean") == 2
    assert a.column_index("driver.count") == 1
    assert a.column_index("count") is None  # ambiguous without the group
    assert a.key(0, "rider-9") == "trips:2:rider-9"
    assert a.key(2, "x") == "geo:5:x"


def test_overrides_scalar_and_per_row() -> None:
    spec = AssemblerSpec(
        groups=GROUPS[:1],
        features=(FeatureRef("trips", "count", -1.0), FeatureRef("trips", "dist")),
    )
    a = Assembler(spec)
    rows: list[bytes | FeatureVector | None] = [
        encode_feature_vector("a", "trips", 2, [1, 2, 3, 4]),
        None,
        encode_feature_vector("c", "trips", 2, [5, 6, 7, 8]),
    ]
    x, mask = a.assemble([rows], overrides={"count": 100.0, "dist": [7.0, 8.0, 9.0]})
    assert x.tolist() == [[100.0, 7.0], [100.0, 8.0], [100.0, 9.0]]
    assert not mask.any()
    x, mask = a.assemble([rows])
    assert x.tolist() == [[1.0, 4.0], [-1.0, 0.0], [5.0, 8.0]]
    assert mask.tolist() == [[False, False], [True, True], [False, False]]
    with pytest.raises(InvalidArgumentError, match="has 2 values; expected 1 or 3"):
        a.assemble([rows], overrides={"dist": [1.0, 2.0]})
    with pytest.raises(InvalidArgumentError, match="unknown feature 'nope'; known: count, dist"):
        a.assemble([rows], overrides={"nope": 1.0})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            AssemblerSpec(GROUPS, (FeatureRef("trip", "count"),)),
            "no group 'trip'; known: trips, driver, geo",
        ),
        (
            AssemblerSpec(GROUPS, (FeatureRef("trips", "fare_p95"),)),
            "'trips' has no feature 'fare_p95'; known: count, fare_mean, fare_p50, dist",
        ),
        (AssemblerSpec(GROUPS, (FeatureRef("trips", "count"),) * 2), "selected twice"),
        (AssemblerSpec((GroupSchema("a:b", 1, ("x",)),), (FeatureRef("a:b", "x"),)), "no ':'"),
        (AssemblerSpec((GroupSchema("a", 1, ("x", "x")),), (FeatureRef("a", "x"),)), "twice"),
        (AssemblerSpec(GROUPS, ()), "selects no features"),
    ],
)
def test_spec_validation(spec: AssemblerSpec, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        Assembler(spec)


def test_vectors_from_the_wrong_group_or_shape_are_refused() -> None:
    a = Assembler(AssemblerSpec(GROUPS[:1], (FeatureRef("trips", "count"),)))
    with pytest.raises(DecodeError, match="for group 'driver' v1, expected 'trips' v2"):
        a.assemble([[FeatureVector("e", "driver", 1, [1.0])]])
    with pytest.raises(DecodeError, match="has 5 values; group 'trips' v2 has 4 features"):
        a.assemble([[encode_feature_vector("e", "trips", 2, [1, 2, 3, 4, 5])]])
    with pytest.raises(InvalidArgumentError, match="one list per feature group"):
        a.assemble([[None], [None]])


def test_plan_fill_through_cache() -> None:
    spec = AssemblerSpec(
        groups=GROUPS[:2],
        features=(FeatureRef("trips", "fare_mean", -1.0), FeatureRef("driver", "rating", -2.0)),
    )
    a = Assembler(spec)
    cache = FeatureCache(capacity=100)
    store = {
        "trips:2:a": encode_feature_vector("a", "trips", 2, [1, 10, 0, 0]),
        "trips:2:b": encode_feature_vector("b", "trips", 2, [1, 20, 0, 0]),
        "driver:1:a": encode_feature_vector("a", "driver", 1, [4.5, 30, 1]),
    }
    plan = a.plan(cache, ["a", "b"])
    assert plan.size == 2
    assert plan.missing_keys == ["trips:2:a", "trips:2:b", "driver:1:a", "driver:1:b"]
    a.fill(plan, [store.get(k) for k in plan.missing_keys], cache)
    x, mask = a.assemble_plan(plan)
    assert x.tolist() == [[10.0, 4.5], [20.0, -2.0]]
    assert mask.tolist() == [[False, False], [False, True]]
    assert len(cache) == 3  # absent rows are not cached

    again = a.plan(cache, ["a", "b"])
    assert again.missing_keys == ["driver:1:b"]
    a.fill(again, [None], cache)
    y, _ = a.assemble_plan(again, overrides={"rating": 1.0})
    assert y.tolist() == [[10.0, 1.0], [20.0, 1.0]]

    bad = a.plan(FeatureCache(capacity=10), ["z"])
    wrong = [
        encode_feature_vector("z", "trips", 2, [0, 1, 0, 0]),
        encode_feature_vector("z", "geo", 5, []),
    ]
    fresh = FeatureCache(capacity=10)
    with pytest.raises(DecodeError, match="expected 'driver' v1"):
        a.fill(bad, wrong, fresh)
    assert len(fresh) == 0  # nothing half-applied
    with pytest.raises(InvalidArgumentError, match="fill got 1 values for 2 missing keys"):
        a.fill(bad, [None])
