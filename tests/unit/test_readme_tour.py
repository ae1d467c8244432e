"""The README's 5-minute tour (the ```` ```python tour ```` block) runs as written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def tour_source() -> str:
    blocks = re.findall(r"^```python tour\n(.*?)^```$", README.read_text(), re.S | re.M)
    assert len(blocks) == 1, "README.md needs exactly one ```python tour block"
    return str(blocks[0])


def test_readme_tour_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the tour writes relative paths
    ns: dict[str, Any] = {"__name__": "__readme_tour__"}
    exec(compile(tour_source(), str(README), "exec"), ns)

    job = ns["job"]
    assert job.state == "SUCCEEDED"
    assert ns["version"] == 1
    # Churn is a function of the two features plus noise: a linear model separates it well.
    assert ns["auc"] > 0.85
    result = ns["result"]
    assert result.entity_ids == ["rider-1", "rider-2"]
    assert result.versions == [1, 1] and not any(result.degraded)
    scores = np.asarray(result.outputs)[:, 0]
    assert scores.shape == (2,) and np.all((scores > 0) & (scores < 1))
    # The rider with the higher churn logit gets the higher churn score.
    logit = ns["churn_logit"]
    assert (scores[0] < scores[1]) == (logit[1] < logit[2])
    # Serving cancel_rate = 0.5 to everyone (training: a Beta(2, 10), mean 1/6) is drift.
    alerts = ns["alerts"]
    assert [(a.kind, a.subject, a.state) for a in alerts] == [("drift", "cancel_rate", "firing")]
    assert alerts[0].value is not None and alerts[0].value >= 0.2  # PSI past the alert line
    assert (tmp_path / "carrara-data" / "registry.db").is_file()
