"""Pure rules: promotion gates and traffic-split validation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carrara.errors import InvalidArgumentError
from carrara.registry import Gate, TrafficSplit, VariantSplit, VersionRef
from carrara.registry.deployments import (
    Served,
    default_split,
    deployed_variants,
    split_versions,
    validate_split,
)
from carrara.registry.gates import evaluate_gates, validate_gates

AUC = Gate(metric="auc", dataset="holdout", threshold=0.8, max_regression=0.02)


def test_gate_results_carry_values_and_references() -> None:
    results = evaluate_gates(
        [AUC], {"holdout": {"auc": 0.85}}, {"holdout": {"auc": 0.88}}, production_version=4
    )
    assert [(r.gate, r.value, r.reference, r.passed) for r in results] == [
        ("threshold", 0.85, 0.8, True),
        ("regression", 0.85, 0.88, False),  # 0.03 worse > 0.02
    ]
    assert "production v4 0.88" in results[1].detail


def test_metric_on_another_dataset_does_not_count() -> None:
    results = evaluate_gates([AUC], {"train": {"auc": 0.99}}, None)
    assert [(r.gate, r.passed) for r in results] == [("threshold", False), ("regression", True)]
    assert "no 'auc' recorded on evaluation dataset 'holdout'" in results[0].detail


@given(
    candidate=st.floats(0, 1),
    production=st.floats(0, 1),
    threshold=st.floats(0, 1),
    margin=st.floats(0, 0.5),
)
def test_gates_match_a_direct_statement_of_the_rule(
    candidate: float, production: float, threshold: float, margin: float
) -> None:
    gate = Gate(metric="m", dataset="d", threshold=threshold, max_regression=margin)
    results = evaluate_gates([gate], {"d": {"m": candidate}}, {"d": {"m": production}})
    expected = candidate >= threshold and production - candidate <= margin + 1e-12
    assert all(r.passed for r in results) == expected
    low = Gate(
        metric="m", dataset="d", threshold=threshold, max_regression=margin, higher_is_better=False
    )
    results = evaluate_gates([low], {"d": {"m": candidate}}, {"d": {"m": production}})
    expected = candidate <= threshold and candidate - production <= margin + 1e-12
    assert all(r.passed for r in results) == expected


@pytest.mark.parametrize(
    ("gate", "message"),
    [
        (Gate(metric="auc", dataset=""), "named evaluation dataset"),
        (Gate(metric="auc", dataset="d"), "neither threshold nor max_regression"),
        (Gate(metric="auc", dataset="d", max_regression=-1), "must be >= 0"),
    ],
)
def test_useless_gates_are_refused(gate: Gate, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        validate_gates([gate])


@given(weights=st.lists(st.integers(0, 10_000), min_size=1, max_size=6))
def test_split_accepted_exactly_when_weights_sum_to_10000(weights: list[int]) -> None:
    split = TrafficSplit(
        variants=[
            VariantSplit(name=f"v{i}", version=i + 1, weight_bp=w) for i, w in enumerate(weights)
        ]
    )
    routed = {i + 1 for i, w in enumerate(weights) if w > 0}
    ok = sum(weights) == 10_000
    target = min(routed) if routed else 1
    if ok:
        validate_split(split, target)
    else:
        with pytest.raises(InvalidArgumentError, match="sum to"):
            validate_split(split, target)


def test_split_versions_and_published_variants() -> None:
    split = TrafficSplit(
        variants=[
            VariantSplit(name="stable", version=3, weight_bp=9_900),
            VariantSplit(name="canary", version=5, weight_bp=100, canary=True),
        ],
        shadows=[VersionRef(name="shadow", version=6)],
        fallback=VersionRef(name="safe", version=2),
    )
    validate_split(split, 5)
    assert split_versions(split) == [2, 3, 5, 6]
    arts = {n: Served(f"/a/{n}.onnx", f"sha{n}", {"n": n}) for n in (2, 3, 5, 6)}
    published = deployed_variants(split, arts)
    assert [(v.name, v.role, v.artifact_path, v.serving_spec) for v in published] == [
        ("stable", "routed", "/a/3.onnx", {"n": 3}),
        ("canary", "routed", "/a/5.onnx", {"n": 5}),
        ("shadow", "shadow", "/a/6.onnx", {"n": 6}),
        ("safe", "fallback", "/a/2.onnx", {"n": 2}),
    ]
    assert default_split(7).variants == [VariantSplit(name="v7", version=7, weight_bp=10_000)]


@pytest.mark.parametrize(
    ("split", "message"),
    [
        (TrafficSplit(variants=[]), "no routed variants"),
        (TrafficSplit(variants=[VariantSplit(name="", version=1, weight_bp=10_000)]), "non-empty"),
        (
            TrafficSplit(
                variants=[
                    VariantSplit(name="a", version=1, weight_bp=-5),
                    VariantSplit(name="b", version=1, weight_bp=10_005),
                ]
            ),
            "0..10000",
        ),
        (
            TrafficSplit(
                variants=[VariantSplit(name="a", version=1, weight_bp=10_000)],
                shadows=[VersionRef(name="a", version=2)],
            ),
            "used twice",
        ),
        (
            TrafficSplit(
                variants=[VariantSplit(name="a", version=1, weight_bp=10_000)],
                shadows=[VersionRef(name="s", version=2)],
                fallback=VersionRef(name="s", version=2),
            ),
            "cannot also be a shadow",
        ),
        (
            TrafficSplit(
                variants=[
                    VariantSplit(name="a", version=1, weight_bp=5_000, canary=True),
                    VariantSplit(name="b", version=2, weight_bp=5_000, canary=True),
                ]
            ),
            "one must be the baseline",
        ),
    ],
)
def test_bad_splits(split: TrafficSplit, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        validate_split(split, 1)


def test_decode_deployment_rejects_foreign_payloads() -> None:
    from carrara.errors import DecodeError
    from carrara.registry.deployments import decode_deployment

    with pytest.raises(DecodeError, match="not a registry deployment event"):
        decode_deployment(b'{"model": "fraud"}')


@pytest.mark.parametrize(
    ("higher_is_better", "value", "passes", "wording"),
    [
        (True, 0.9, True, "must be at least 0.9"),  # the boundary passes, and says so
        (True, 0.8999, False, "must be at least 0.9"),
        (False, 0.9, True, "must be at most 0.9"),
        (False, 0.9001, False, "must be at most 0.9"),
    ],
)
def test_threshold_wording_matches_the_inclusive_check(
    higher_is_better: bool, value: float, passes: bool, wording: str
) -> None:
    gate = Gate(metric="auc", dataset="holdout", threshold=0.9, higher_is_better=higher_is_better)
    (result,) = evaluate_gates([gate], {"holdout": {"auc": value}}, None)
    assert result.passed is passes
    assert wording in result.detail
    assert "above" not in result.detail and "below" not in result.detail
