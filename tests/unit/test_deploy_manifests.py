"""The Kubernetes manifests in ``deploy/`` hold together and match the code they run.

Every YAML document is parsed; workloads have resources and probes; Services, HPAs and PDBs
select what exists; every ``carrara ...`` container command parses with the real CLI parser;
the ConfigMap's settings and gateway config load through the real loaders; references to
Secrets, ConfigMaps and volume claims resolve. ``kubectl kustomize`` renders both entry points
when kubectl is installed, and the distributed PyTorch example runs under ``torchrun``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from carrara.cli import build_parser
from carrara.config import ENV_PREFIX, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
#: The kustomize entry points: CPU cluster, GPU cluster, and the CPU cluster with artifacts,
#: checkpoints and the offline store in an object store.
ENTRY_POINTS = (DEPLOY, DEPLOY / "gpu", DEPLOY / "object-store")
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")
IMAGE = "ghcr.io/carrara-ml/carrara"
#: The image of each role (deploy/Dockerfile's ROLE): the package extra it installs.
ROLE_IMAGES = {
    IMAGE: "platform",
    f"{IMAGE}-serving": "serving",
    f"{IMAGE}-features": "features",
    f"{IMAGE}-monitoring": "monitoring",
    f"{IMAGE}-training": "training",
}
#: Which role runs each command: a workload's image must be that role's (or platform's).
COMMAND_ROLES = {
    "serve": "serving",
    "materialize": "features",
    "monitor": "monitoring",
    "train": "training",
    "db": "platform",
    "_api": "platform",
}

Doc = dict[str, Any]


def _kustomization(folder: Path) -> Doc:
    doc: Doc = yaml.safe_load((folder / "kustomization.yaml").read_text())
    return doc


def _resource_files(folder: Path) -> Iterator[Path]:
    """The resource files a kustomization pulls in, following folder references."""
    for entry in _kustomization(folder).get("resources", []):
        path = (folder / entry).resolve()
        if path.is_dir():
            yield from _resource_files(path)
        else:
            yield path


def _docs(entry: Path) -> list[Doc]:
    docs: list[Doc] = []
    for path in _resource_files(entry):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d is not None)
    return docs


ALL: dict[str, list[Doc]] = {str(e.relative_to(ROOT)): _docs(e) for e in ENTRY_POINTS}


def _by_kind(docs: list[Doc], *kinds: str) -> list[Doc]:
    return [d for d in docs if d["kind"] in kinds]


def _pod_spec(workload: Doc) -> Doc:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    pod: Doc = spec["template"]["spec"]
    return pod


def _pod_labels(workload: Doc) -> dict[str, str]:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    labels: dict[str, str] = spec["template"]["metadata"]["labels"]
    return labels


def _containers(docs: list[Doc]) -> Iterator[tuple[str, Doc, Doc]]:
    """(workload name, pod spec, container); a StatefulSet's claim templates count as volumes."""
    for w in _by_kind(docs, *WORKLOADS):
        pod = _pod_spec(w)
        claims = [
            {"name": t["metadata"]["name"], "volumeClaimTemplate": True}
            for t in w["spec"].get("volumeClaimTemplates", [])
        ]
        if claims:
            pod = {**pod, "volumes": [*pod.get("volumes", []), *claims]}
        for c in pod.get("initContainers", []) + pod["containers"]:
            yield w["metadata"]["name"], pod, c


def _config_data(name: str) -> dict[str, str]:
    for docs in ALL.values():
        for d in _by_kind(docs, "ConfigMap"):
            if d["metadata"]["name"] == name:
                data: dict[str, str] = d["data"]
                return data
    raise AssertionError(f"no ConfigMap {name}")


entry_points = pytest.mark.parametrize("entry", sorted(ALL))
_RENDEZVOUS_RACE = re.compile(r"address already in use|EADDRINUSE|DistNetworkError", re.I)


def test_every_file_is_listed_in_its_kustomization() -> None:
    for folder in (DEPLOY, DEPLOY / "base", DEPLOY / "gpu", DEPLOY / "object-store"):
        k = _kustomization(folder)
        listed = {
            (folder / e).resolve() for e in k.get("resources", []) if not (folder / e).is_dir()
        }
        listed |= {(folder / p["path"]).resolve() for p in k.get("patches", []) if "path" in p}
        present = {p.resolve() for p in folder.glob("*.yaml") if p.name != "kustomization.yaml"}
        assert listed == present, f"{folder}: listed {sorted(listed)} != files {sorted(present)}"


@entry_points
def test_documents_have_kind_and_name(entry: str) -> None:
    docs = ALL[entry]
    assert len(docs) >= 20
    for d in docs:
        assert d.get("apiVersion") and d.get("kind"), d
        assert d.get("metadata", {}).get("name"), d
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "duplicate kind/name"
    kinds = {d["kind"] for d in docs}
    assert {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "StatefulSet",
    } <= kinds


@entry_points
def test_containers_have_resources_and_deployments_have_probes(entry: str) -> None:
    docs = ALL[entry]
    for workload, _, c in _containers(docs):
        res = c.get("resources", {})
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res.get(part, {})), f"{workload}/{c['name']} {part}"
        gpus = res.get("limits", {}).get("nvidia.com/gpu")
        if gpus is not None:  # GPUs cannot be overcommitted: requests == limits
            assert res["requests"]["nvidia.com/gpu"] == gpus
    for d in _by_kind(docs, "Deployment", "StatefulSet", "DaemonSet"):
        for c in _pod_spec(d)["containers"]:
            assert "readinessProbe" in c and "livenessProbe" in c, d["metadata"]["name"]


@entry_points
def test_selectors_match_workloads(entry: str) -> None:
    docs = ALL[entry]
    workloads = _by_kind(docs, *WORKLOADS)
    pods = [_pod_labels(w) for w in workloads]

    def selects(selector: dict[str, str]) -> bool:
        return any(selector.items() <= labels.items() for labels in pods)

    for svc in _by_kind(docs, "Service"):
        selector = svc["spec"]["selector"]
        assert selector and selects(selector), f"Service {svc['metadata']['name']} selects nothing"
    for w in _by_kind(docs, "Deployment", "StatefulSet", "DaemonSet"):
        match = w["spec"]["selector"]["matchLabels"]
        assert match.items() <= _pod_labels(w).items(), w["metadata"]["name"]
    deployments = {d["metadata"]["name"]: d for d in _by_kind(docs, "Deployment")}
    for hpa in _by_kind(docs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert ref["kind"] == "Deployment" and ref["name"] in deployments
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    for pdb in _by_kind(docs, "PodDisruptionBudget"):
        assert selects(pdb["spec"]["selector"]["matchLabels"])
    # The gateway serves gRPC and HTTP, probed on the endpoints it really serves.
    gw = _pod_spec(deployments["carrara-gateway"])["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in gw["ports"]}
    assert ports == {"grpc": 8001, "http": 8000}
    assert gw["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gw["livenessProbe"]["grpc"]["port"] == 8001


def _gateway_http_paths() -> set[str]:
    from carrara.gateway.http_front import create_app

    app = create_app(None)  # type: ignore[arg-type]  # routes only, never called
    return {r.path for r in app.routes}  # type: ignore[attr-defined]


def test_http_probes_hit_routes_the_services_serve() -> None:
    from carrara.services import OWN_PATHS

    served = {
        "carrara-gateway": _gateway_http_paths(),
        "carrara-control-plane": set(OWN_PATHS),  # the composed API's own /healthz, /readyz
        "carrara-monitoring": {"/metrics"},  # prometheus_client's server answers any path
    }
    checked = 0
    for workload, _, c in _containers(ALL["deploy/gpu"]):
        if c["image"].split(":")[0] not in ROLE_IMAGES:
            continue
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            http = c.get(probe, {}).get("httpGet")
            if http:
                assert http["path"] in served[workload], (workload, probe, http["path"])
                checked += 1
    assert checked >= 6


@entry_points
def test_carrara_commands_parse_with_the_real_cli(
    entry: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import carrara.up

    parser = build_parser()
    commands = []
    # `python -m carrara.up _api ...`: the control-plane process of `carrara up`; its entry
    # point parses the flags and calls the role's function, stubbed here.
    started: list[str] = []
    monkeypatch.setattr(carrara.up, "_run_api", lambda args: started.append("api") or 0)
    monkeypatch.setattr(carrara.up, "_run_gateway", lambda args: started.append("gw") or 0)
    for workload, _, c in _containers(ALL[entry]):
        argv = [*c.get("command", []), *c.get("args", [])]
        if c["image"].split(":")[0] not in ROLE_IMAGES or not argv:
            continue
        try:
            if argv[0] == "carrara":
                args = parser.parse_args(argv[1:])
                assert callable(getattr(args, "func", None)), argv
                commands.append(argv[1])
            elif argv[:3] == ["python", "-m", "carrara.up"]:
                assert carrara.up.main(argv[3:]) == 0
                commands.append(argv[3])
        except SystemExit as exc:  # argparse reports the bad flag on stderr
            raise AssertionError(f"{workload}: {' '.join(argv)} does not parse") from exc
    assert {"serve", "train", "monitor", "materialize", "db", "_api"} <= set(commands)
    assert started == ["api"]


def test_image_tag_is_the_package_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    images = {c["image"] for docs in ALL.values() for _, _, c in _containers(docs)}
    ours = {i for i in images if i.startswith(IMAGE)}
    assert ours == {f"{name}:{version}" for name in ROLE_IMAGES}
    for folder in ENTRY_POINTS:
        listed = {i["name"]: i["newTag"] for i in _kustomization(folder)["images"]}
        assert listed == dict.fromkeys(ROLE_IMAGES, version), folder
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:\$\{PYTHON\}-slim-bookworm", dockerfile, re.M)
    # One Dockerfile, the role's extra installed from the self-contained wheel (auditwheel):
    # no system protobuf at run time.
    assert 'pip install --no-cache-dir "${wheel}[${ROLE}]"' in dockerfile
    assert "scripts/build-wheel.sh" in dockerfile and "libprotobuf32" not in dockerfile
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for name, role in ROLE_IMAGES.items():
        assert role in extras
        assert f"--build-arg ROLE={role}" in dockerfile or role == "platform", name
        assert f"{name}:" in dockerfile, name


def test_each_workload_runs_its_roles_image() -> None:
    """The gateway runs the serving image (no training frameworks), workers the training
    image, and so on: each command in the image of the role that has its packages."""
    checked = set()
    for entry in ENTRY_POINTS:
        for workload, _, c in _containers(ALL[str(entry.relative_to(ROOT))]):
            name = c["image"].split(":")[0]
            argv = [*c.get("command", []), *c.get("args", [])]
            if name not in ROLE_IMAGES or not argv:
                continue
            command = (
                argv[1]
                if argv[0] == "carrara"
                else argv[3]
                if argv[:3] == ["python", "-m", "carrara.up"]
                else None
            )
            if command not in COMMAND_ROLES:
                continue
            assert ROLE_IMAGES[name] == COMMAND_ROLES[command], (workload, command, name)
            checked.add(command)
    assert checked == set(COMMAND_ROLES)


def test_settings_in_the_configmap_load(tmp_path: Path) -> None:
    from carrara.eventlog import open_event_log
    from carrara.feature_cache.online_store import open_online_store

    toml = _config_data("carrara-config")["carrara.toml"]
    keys = set(tomllib.loads(toml)["carrara"])
    fields = {f.name for f in msgspec.structs.fields(Settings)}
    assert keys <= fields, f"not Settings fields: {keys - fields}"
    path = tmp_path / "carrara.toml"
    path.write_text(toml)
    settings = load_settings(path, env={})
    assert settings.resolved_registry_url.startswith("postgresql://")
    assert settings.resolved_offline_store_path == "/var/lib/carrara/offline"
    assert settings.resolved_artifact_path == "/var/lib/carrara/artifacts"
    # The URLs open (Redis clients connect lazily, so nothing is contacted here).
    log = open_event_log(settings.resolved_event_log_url)
    store = open_online_store(settings.online_store_url)
    log.close()
    store.close()


def test_object_store_overlay_points_every_store_at_the_bucket(tmp_path: Path) -> None:
    """deploy/object-store: the patched settings load with s3:// roots, the gateway reads the
    artifact root the others write, and every Carrara Deployment/CronJob gets the Secret
    with the AWS_* variables botocore reads (rendered by kubectl when installed)."""
    from carrara.gateway.config import load_gateway_config

    folder = DEPLOY / "object-store"
    patch = yaml.safe_load((folder / "config-patch.yaml").read_text())
    assert patch["kind"] == "ConfigMap" and patch["metadata"]["name"] == "carrara-config"
    toml_path = tmp_path / "carrara.toml"
    toml_path.write_text(patch["data"]["carrara.toml"])
    settings = load_settings(toml_path, env={})
    assert settings.resolved_offline_store_path.startswith("s3://")
    assert settings.resolved_artifact_path.startswith("s3://")
    base = tomllib.loads(_config_data("carrara-config")["carrara.toml"])["carrara"]
    ours = tomllib.loads(patch["data"]["carrara.toml"])["carrara"]
    changed = {k for k in base.keys() | ours.keys() if base.get(k) != ours.get(k)}
    assert changed == {"offline_store_path", "artifact_path"}, changed
    gw_path = tmp_path / "gateway.yaml"
    gw_path.write_text(patch["data"]["gateway.yaml"])
    gw = load_gateway_config(gw_path)
    assert gw.registry is not None and gw.registry.artifact_path == settings.artifact_path
    [secret] = [
        d
        for d in ALL["deploy/object-store"]
        if d["kind"] == "Secret" and d["metadata"]["name"] == "carrara-object-store"
    ]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])
    assert all(k.startswith("AWS_") for k in secret["stringData"])  # none refused by Settings
    if shutil.which("kubectl") is None:
        return
    out = subprocess.run(
        ["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d is not None]
    [config] = [
        d
        for d in rendered
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "carrara-config"
    ]
    assert config["data"] == patch["data"]
    with_secret = set()
    for w in _by_kind(rendered, "Deployment", "CronJob"):
        c = _pod_spec(w)["containers"][0]
        assert c["image"].split(":")[0] in ROLE_IMAGES, w["metadata"]["name"]
        assert {"secretRef": {"name": "carrara-object-store"}} in c.get("envFrom", [])
        with_secret.add(w["metadata"]["name"])
    assert {"carrara-gateway", "carrara-training-worker", "carrara-control-plane"} <= with_secret


@pytest.mark.parametrize("configmap", ["carrara-config", "carrara-gateway-triton"])
def test_gateway_configs_load(configmap: str, tmp_path: Path) -> None:
    from carrara.gateway.config import load_gateway_config

    path = tmp_path / "gateway.yaml"
    path.write_text(_config_data(configmap)["gateway.yaml"])
    config = load_gateway_config(path)
    assert config.registry is not None and config.registry.models == ("rider_churn",)
    toml = tomllib.loads(_config_data("carrara-config")["carrara.toml"])["carrara"]
    # The gateway reads what the other processes write: same stores, same event log; it
    # holds no registry database credentials.
    assert config.registry.url is None
    assert "postgresql" not in _config_data(configmap)["gateway.yaml"]
    assert config.registry.artifact_path == toml["artifact_path"]
    assert config.online_store_url == toml["online_store_url"]
    assert config.event_log_url == config.registry.event_log_url == toml["event_log_url"]
    for model in config.models:
        for v in model.variants:
            assert v.backend == "triton" and v.triton_url == "carrara-triton:8001"
            widths = sum(len(g.features) for g in v.features.groups)
            assert len(v.features.features) == widths


@entry_points
def test_environment_and_references_resolve(entry: str) -> None:
    docs = ALL[entry]
    fields = {f.name.upper() for f in msgspec.structs.fields(Settings)}
    secrets = {
        d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {}))
        for d in _by_kind(docs, "Secret")
    }
    configmaps = {d["metadata"]["name"]: set(d["data"]) for d in _by_kind(docs, "ConfigMap")}
    claims = {d["metadata"]["name"] for d in _by_kind(docs, "PersistentVolumeClaim")}
    for workload, pod, c in _containers(docs):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps, (workload, v)
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, (workload, v)
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, (workload, m)
        env = {e["name"]: e for e in c.get("env", [])}
        for name, e in env.items():
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in secrets[ref["name"]], (workload, name)
        if c["image"].split(":")[0] not in ROLE_IMAGES:
            continue
        # Settings refuses unknown CARRARA_* variables, and service links would add some
        # (CARRARA_GATEWAY_PORT, ...) for every Service named carrara-*.
        assert pod.get("enableServiceLinks") is False, workload
        # The image's user (deploy/Dockerfile), which must be able to write the shared volume.
        uid = int(re.findall(r"--uid (\d+)", (DEPLOY / "Dockerfile").read_text())[0])
        sc = pod.get("securityContext", {})
        assert sc.get("runAsNonRoot") is True and sc.get("runAsUser") == sc.get("fsGroup") == uid
        for name in env:
            if name.startswith(ENV_PREFIX) and name != f"{ENV_PREFIX}CONFIG":
                assert name[len(ENV_PREFIX) :] in fields, (workload, name)
        config = env.get(f"{ENV_PREFIX}CONFIG")
        if config is not None:
            mounted = [m for m in c["volumeMounts"] if config["value"].startswith(m["mountPath"])]
            assert mounted, (workload, "CARRARA_CONFIG is not on a mounted volume")
            key = Path(config["value"]).name
            assert key in configmaps[volumes[mounted[0]["name"]]["configMap"]["name"]]
        # $(VAR) in args expands only from the container's own env.
        for arg in [*c.get("command", []), *c.get("args", [])]:
            for var in re.findall(r"\$\((\w+)\)", arg):
                assert var in env, (workload, arg)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@entry_points
def test_kubectl_kustomize_renders(entry: str) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / entry)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    rendered = [d for d in yaml.safe_load_all(out) if d is not None]
    assert len(rendered) == len(ALL[entry])
    namespaced = [d for d in rendered if d["kind"] != "Namespace"]
    assert {d["metadata"].get("namespace") for d in namespaced} == {"carrara"}
    if entry == "deploy/gpu":  # the patch points the gateway at the Triton config
        gw = next(
            d
            for d in _by_kind(rendered, "Deployment")
            if d["metadata"]["name"] == "carrara-gateway"
        )
        c = _pod_spec(gw)["containers"][0]
        assert "/etc/carrara-triton/gateway.yaml" in c["args"]
        assert {v["name"] for v in _pod_spec(gw)["volumes"]} == {
            "config",
            "data",
            "state",
            "triton-config",
        }


def test_distributed_pytorch_example_trains_in_sync(tmp_path: Path) -> None:
    """The torchrun Job's script, run here as 2 ranks on one node (Gloo on CPU)."""
    pytest.importorskip("torch")
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    [job] = [
        d for d in _by_kind(ALL["deploy/gpu"], "Job") if d["metadata"]["name"] == "carrara-ddp"
    ]
    trainer = _pod_spec(job)["containers"][0]
    assert trainer["command"] == ["torchrun"]
    assert f"--nnodes={job['spec']['completions']}" in trainer["args"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["parallelism"] == job["spec"]["completions"]
    script = tmp_path / "ddp_train.py"
    script.write_text(_config_data("carrara-ddp-script")["ddp_train.py"])
    env = {**os.environ, "STEPS": "50", "OMP_NUM_THREADS": "1"}
    for attempt in range(2):
        out = subprocess.run(
            [str(torchrun), "--standalone", "--nnodes=1", "--nproc-per-node=2", str(script)],
            capture_output=True,
            text=True,
            timeout=50,
            env=env,
            cwd=tmp_path,
        )
        # One retry, only for a lost port race of the loopback rendezvous on a busy machine.
        if out.returncode == 0 or attempt or not _RENDEZVOUS_RACE.search(out.stderr):
            break
    assert out.returncode == 0, out.stderr[-3000:]
    m = re.search(r"world=(\d+) loss=([0-9.]+) in_sync=(\w+)", out.stdout)
    assert m, out.stdout
    assert int(m.group(1)) == 2
    assert float(m.group(2)) < 1e-3  # noise variance is 1e-4: the fit converged
    assert m.group(3) == "True"
