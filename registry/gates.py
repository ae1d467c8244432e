"""Automated promotion gates: a metric at or past a threshold and no worse than production.

Pure functions over recorded evaluation metrics (``{dataset: {metric: value}}``), so the
decision is testable on its own and the store only persists what they return.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from carrara.errors import InvalidArgumentError
from carrara.registry.types import Gate, GateResult

__all__ = ["evaluate_gates", "validate_gates"]

Evaluations = Mapping[str, Mapping[str, float]]


def validate_gates(gates: Sequence[Gate]) -> None:
    """Refuse gates that can never decide anything."""
    for g in gates:
        if not g.metric or not g.dataset:
            raise InvalidArgumentError("a gate needs a metric and a named evaluation dataset")
        if g.threshold is None and g.max_regression is None:
            raise InvalidArgumentError(
                f"gate on {g.metric!r}@{g.dataset!r} sets neither threshold nor max_regression"
            )
        if g.max_regression is not None and g.max_regression < 0:
            raise InvalidArgumentError(
                f"gate on {g.metric!r}@{g.dataset!r}: max_regression must be >= 0, "
                f"got {g.max_regression}"
            )


def _lookup(evals: Evaluations, gate: Gate) -> float | None:
    value = evals.get(gate.dataset, {}).get(gate.metric)
    return None if value is None else float(value)


def evaluate_gates(
    gates: Sequence[Gate],
    candidate: Evaluations,
    production: Evaluations | None,
    *,
    production_version: int | None = None,
) -> list[GateResult]:
    """Check every gate of ``candidate`` against its threshold and the production version."""
    results: list[GateResult] = []
    for g in gates:
        value = _lookup(candidate, g)
        sign = 1.0 if g.higher_is_better else -1.0
        word = "at least" if g.higher_is_better else "at most"
        if g.threshold is not None:
            if value is None:
                results.append(_missing("threshold", g, None))
            else:
                ok = sign * (value - g.threshold) >= 0
                results.append(
                    GateResult(
                        gate="threshold",
                        dataset=g.dataset,
                        metric=g.metric,
                        value=value,
                        reference=g.threshold,
                        passed=ok,
                        detail=f"{g.metric}@{g.dataset} = {value:g}, must be {word} "
                        f"{g.threshold:g}",
                    )
                )
        if g.max_regression is not None:
            ref = None if production is None else _lookup(production, g)
            if production is None:
                results.append(
                    GateResult(
                        gate="regression",
                        dataset=g.dataset,
                        metric=g.metric,
                        value=value,
                        reference=None,
                        passed=True,
                        detail="no production version to compare with",
                    )
                )
            elif value is None:
                results.append(_missing("regression", g, ref))
            elif ref is None:
                results.append(
                    GateResult(
                        gate="regression",
                        dataset=g.dataset,
                        metric=g.metric,
                        value=value,
                        reference=None,
                        passed=True,
                        detail=f"production version {production_version} has no "
                        f"{g.metric}@{g.dataset} to compare with",
                    )
                )
            else:
                worse_by = sign * (ref - value)
                ok = worse_by <= g.max_regression + 1e-12
                results.append(
                    GateResult(
                        gate="regression",
                        dataset=g.dataset,
                        metric=g.metric,
                        value=value,
                        reference=ref,
                        passed=ok,
                        detail=f"{g.metric}@{g.dataset} = {value:g} vs production v"
                        f"{production_version} {ref:g}; may be worse by at most "
                        f"{g.max_regression:g}",
                    )
                )
    return results


def _missing(kind: str, g: Gate, ref: float | None) -> GateResult:
    return GateResult(
        gate="threshold" if kind == "threshold" else "regression",
        dataset=g.dataset,
        metric=g.metric,
        value=None,
        reference=ref if kind == "regression" else g.threshold,
        passed=False,
        detail=f"no {g.metric!r} recorded on evaluation dataset {g.dataset!r}; record it "
        "with record_evaluation (carrara models evaluate) before promoting",
    )
