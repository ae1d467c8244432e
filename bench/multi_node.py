"""Multi-node training from the queue: one PyTorch job on 1 node vs the same job on 2 nodes.

Two ``carrara train worker`` processes (nodes ``n1`` and ``n2``) serve a queue on SQLite (or the
``--db`` URL); the same job (seeded MLP, same global batch) runs with ``resources.nodes = 1``
and ``= 2``. Reported per configuration, median over ``--repeats``: the fit time (the job's
"fitting" to "fitted" log lines: torchrun start, rendezvous, epochs, final state; for 2 nodes
also the inputs handed to the other node) and submit-to-SUCCEEDED. Both nodes share this
machine's cores, so this measures the cost of the multi-node path, not a speedup.

    python -m bench.multi_node [--rows 20000] [--epochs 4] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import numpy as np
import pandas as pd

from carrara.feature_cache import Definitions, Entity, Feature, FeatureGroup, FeatureService
from carrara.training.queue import Job, JobQueue
from carrara.training.spec import DatasetSpec, JobSpec, ModelSpec, Resources

DAY_US = 86_400_000_000
T0_US = 1_780_000_000_000_000


class Result(msgspec.Struct):
    name: str
    median_ns: int
    p99_ns: int
    extra: dict[str, float] = {}


def _spec(folder: Path, url: str, rows: int, epochs: int, width: int) -> JobSpec:
    n_features = 8
    with FeatureService.open(catalog_url=url, offline_path=str(folder / "offline")) as features:
        feats = tuple(Feature(name=f"f{i}") for i in range(n_features))
        features.apply(
            Definitions(
                entities=(Entity(name="thing", join_key="id"),),
                groups=(FeatureGroup(name="g", entity="thing", features=feats),),
            )
        )
        rng = np.random.default_rng(3)
        ids = [f"e{i}" for i in range(rows)]
        x = rng.normal(size=(rows, n_features))
        frame = pd.DataFrame({f"f{i}": x[:, i] for i in range(n_features)})
        frame.insert(0, "event_timestamp", T0_US)
        frame.insert(0, "id", ids)
        features.ingest("g", frame)
    pd.DataFrame(
        {
            "id": ids,
            "event_timestamp": T0_US + DAY_US + np.arange(rows),
            "y": (x[:, 0] - 2 * x[:, 1] + x[:, 2] * x[:, 3] > 0).astype(np.int64),
        }
    ).to_parquet(folder / "labels.parquet")
    return JobSpec(
        model_name="bench-nodes",
        dataset=DatasetSpec(
            features=[f"g:f{i}" for i in range(n_features)],
            label_source=str(folder / "labels.parquet"),
            label_column="y",
            entity_column="id",
        ),
        model=ModelSpec(
            framework="pytorch",
            estimator="mlp",
            params={"epochs": epochs, "batch_size": 256, "hidden": [width, width], "lr": 0.01},
        ),
        seed=1,
    )


def _workers(folder: Path, url: str) -> list[subprocess.Popen[bytes]]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CARRARA_")},
        "CARRARA_HOME": str(folder / "home"),
        "CARRARA_REGISTRY_URL": url,
        "CARRARA_OFFLINE_STORE_PATH": str(folder / "offline"),
        "CARRARA_ARTIFACT_PATH": str(folder / "artifacts"),
        "CARRARA_EVENT_LOG_URL": f"local:///{folder / 'events.db'}",
        "CARRARA_DATA_ROOTS": str(folder),
    }
    procs = []
    for node in ("n1", "n2"):
        log = open(folder / f"{node}.log", "wb")  # noqa: SIM115 - the process owns it
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "carrara",
                    "train",
                    "worker",
                    "--node",
                    node,
                    "--address",
                    "127.0.0.1",
                    "--poll",
                    "0.2",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        log.close()
    return procs


def _diagnosis(queue: JobQueue, job: Job, folder: Path) -> str:
    """The job's log and the tail of each worker's output, for a run that went wrong."""
    parts = [f"job {job.job_id} log:"]
    parts += [f"  {x.ts_us} {x.message}" for x in queue.logs(job.job_id)[-40:]]
    for node in ("n1", "n2"):
        out = folder / f"{node}.log"
        text = out.read_text(errors="replace") if out.exists() else "(none)"
        parts.append(f"worker {node} output (tail):\n{text[-4000:]}")
    return "\n".join(parts)


def _run(
    queue: JobQueue, spec: JobSpec, timeout_s: float, folder: Path
) -> tuple[Job, float, float]:
    job = queue.submit(spec, submitted_by="bench")
    t0 = time.monotonic()
    while True:
        done = queue.get(job.job_id)
        if done.state in ("SUCCEEDED", "FAILED", "CANCELLED"):
            break
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(
                f"job {job.job_id} still {done.state} after {timeout_s} s\n"
                + _diagnosis(queue, done, folder)
            )
        time.sleep(0.05)
    total = time.monotonic() - t0
    if done.state != "SUCCEEDED":
        raise RuntimeError(
            f"job {job.job_id} {done.state}: {done.error}\n" + _diagnosis(queue, done, folder)
        )
    lines = queue.logs(job.job_id)
    start = next(x.ts_us for x in lines if x.message.startswith("fitting "))
    end = next(x.ts_us for x in lines if x.message.startswith("fitted"))
    return done, (end - start) / 1e6, total


#: (nodes, ranks per node): one process; two torchrun ranks on one node; one rank on each of
#: two nodes.
CONFIGS = ((1, 1), (1, 2), (2, 1))


def bench(
    rows: int,
    epochs: int,
    width: int,
    repeats: int,
    db: str | None,
    timeout_s: float,
    configs: tuple[tuple[int, int], ...] = CONFIGS,
) -> list[Result]:
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="carrara-bench-nodes-") as tmp:
        folder = Path(tmp)
        url = db or f"sqlite:///{folder / 'registry.db'}"
        spec = _spec(folder, url, rows, epochs, width)
        procs = _workers(folder, url)
        try:
            with JobQueue.open(url) as queue:
                for nodes, ranks in configs:
                    fits: list[float] = []
                    totals: list[float] = []
                    one = msgspec.structs.replace(
                        spec,
                        model_name=f"bench-{nodes}-nodes-{ranks}-ranks",
                        resources=Resources(nodes=nodes, processes_per_node=ranks),
                    )
                    for _ in range(repeats):
                        _, fit_s, total_s = _run(queue, one, timeout_s, folder)
                        fits.append(fit_s)
                        totals.append(total_s)
                    fits.sort()
                    name = f"train_{nodes}x{ranks}_ranks_{rows}_rows"
                    results.append(
                        Result(
                            name,
                            int(statistics.median(fits) * 1e9),
                            int(fits[-1] * 1e9),
                            {
                                "submit_to_done_s": statistics.median(totals),
                                "epochs": float(epochs),
                                "rows": float(rows),
                            },
                        )
                    )
                    print(
                        f"  {nodes} node(s) x {ranks} rank(s): fit {statistics.median(fits):.2f} s "
                        f"(max {fits[-1]:.2f}), submit to done {statistics.median(totals):.2f} s",
                        flush=True,
                    )
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--width", type=int, default=64, help="hidden layer width")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--db", help="queue/registry URL (default: SQLite in a temp folder)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument(
        "--configs",
        default=",".join(f"{n}x{r}" for n, r in CONFIGS),
        help="NODESxRANKS per configuration (default: 1x1,1x2,2x1)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one run (smoke)")
    parser.add_argument("--json", help="write results to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.epochs, args.width, args.repeats = 400, 2, 8, 1
    configs = tuple(
        (int(n), int(r)) for n, r in (c.split("x") for c in args.configs.split(",") if c)
    )
    results = bench(
        args.rows, args.epochs, args.width, args.repeats, args.db, args.timeout, configs
    )
    if args.json:
        with open(args.json, "wb") as fh:
            fh.write(msgspec.json.encode(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
