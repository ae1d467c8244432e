"""``carrara demo``: a short showcase of the native serving core on synthetic data.

It encodes feature vectors for three feature groups, serves a batch of entities through the
cache -> online store -> assembler path, routes them over a 90/10 canary deployment, and prints
what happened. Later issues grow this into the whole loop (features -> train -> serve).
"""

from __future__ import annotations

import time

import numpy as np
from rich.console import Console
from rich.table import Table

from carrara.core import (
    Assembler,
    AssemblerSpec,
    FeatureCache,
    FeatureRef,
    GroupSchema,
    Router,
    RoutingPolicy,
    Variant,
    encode_feature_vector,
)

__all__ = ["run_core_showcase"]

GROUPS = (
    GroupSchema("trips", 1, tuple(f"trips_f{i}" for i in range(32))),
    GroupSchema("driver", 3, tuple(f"driver_f{i}" for i in range(32))),
    GroupSchema("geo", 2, tuple(f"geo_f{i}" for i in range(32))),
)


def run_core_showcase(entities: int = 10_000, console: Console | None = None) -> int:
    """Run the showcase; returns a process exit code (0 when every check held)."""
    console = console or Console()
    rng = np.random.default_rng(7)
    spec = AssemblerSpec(
        groups=GROUPS,
        features=tuple(FeatureRef(g.name, f, -1.0) for g in GROUPS for f in g.features),
    )
    assembler = Assembler(spec)
    ids = [f"rider-{i}" for i in range(entities)]
    # The "online store": a dict of encoded FeatureVector protobufs, one per (group, entity);
    # every tenth entity has no geo row, so its geo features fall back to defaults.
    truth = rng.normal(size=(len(GROUPS), entities, 32)).astype(np.float32)
    store: dict[str, bytes] = {}
    for g, group in enumerate(GROUPS):
        for i, entity in enumerate(ids):
            if group.name == "geo" and i % 10 == 0:
                continue
            store[assembler.key(g, entity)] = encode_feature_vector(
                entity, group.name, group.version, truth[g, i]
            )
    # Headroom: capacity is split evenly over shards, and keys do not spread perfectly evenly.
    cache = FeatureCache(capacity=2 * entities * len(GROUPS), ttl_seconds=30.0)

    def serve(batch: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
        plan = assembler.plan(cache, batch)
        misses = plan.missing_keys
        assembler.fill(plan, [store.get(k) for k in misses], cache)
        x, mask = assembler.assemble_plan(plan)
        return x, mask, len(misses)

    t0 = time.perf_counter()
    x_cold, mask_cold, misses_cold = serve(ids)
    t1 = time.perf_counter()
    x_warm, _, misses_warm = serve(ids)
    t2 = time.perf_counter()

    expected = truth.transpose(1, 0, 2).reshape(entities, -1).copy()
    expected[::10, 64:] = -1.0
    ok = bool(np.array_equal(x_cold, expected) and np.array_equal(x_warm, expected))
    ok &= int(mask_cold.sum()) == len(range(0, entities, 10)) * 32

    router = Router(
        RoutingPolicy(
            variants=(Variant("v7", 9_000), Variant("v8-canary", 1_000, canary=True)),
            salt="demo",
            fallback="v7",
        )
    )
    routed = router.route_many(ids)
    counts = np.bincount(routed, minlength=2)

    table = Table(title="Carrara native core showcase")
    table.add_column("step")
    table.add_column("result", justify="right")
    table.add_row("entities x features", f"{entities} x {assembler.dim}")
    table.add_row(
        "cold batch (store fetch + decode)", f"{(t1 - t0) * 1e3:.1f} ms, {misses_cold} misses"
    )
    table.add_row("warm batch (all cached)", f"{(t2 - t1) * 1e3:.1f} ms, {misses_warm} misses")
    table.add_row("per entity, warm", f"{(t2 - t1) / entities * 1e9:.0f} ns")
    table.add_row("cache", str(cache.stats()))
    table.add_row("routing v7 / canary", f"{counts[0]} / {counts[1]}")
    table.add_row("assembled == reference", "yes" if ok else "NO")
    console.print(table)
    # Entities absent from the store stay misses (nothing to cache); everything else hits.
    absent_rows = len(range(0, entities, 10))
    return 0 if ok and misses_warm == absent_rows else 1
