"""Gateway auth, end to end on real servers: bearer tokens on both fronts (no token and a wrong
token are UNAUTHENTICATED / 401, the right one predicts; health, readiness and metrics stay
open), TLS (a secure channel trusting the self-signed CA works, plaintext and other roots fail),
mutual TLS, the gateway YAML / Settings / Client / ``carrara predict`` / ``carrara serve``
plumbing, and the default (no auth) unchanged. Certificates come from the openssl CLI."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

import carrara
from carrara import errors
from carrara.config import load_settings
from carrara.core import (
    AssemblerSpec,
    FeatureRef,
    GroupSchema,
)
from carrara.gateway.auth import FrontAuth
from carrara.gateway.config import load_gateway_config
from carrara.gateway.grpc_client import bearer_metadata, open_channel, predict_stub
from carrara.gateway.onnx_models import write_linear_model
from carrara.gateway.server import GatewayServer
from carrara.up import Services, UpConfig, settings_env
from carrara.v1 import predict_pb2
from tests.servers import DictStore, free_port, running_gateway, scorer_engine, serve_process

pytestmark = pytest.mark.integration

TOKEN = "gw-token-5d1e77"
OTHER_TOKEN = "gw-token-second"
WRONG = "not-the-token"
GROUP = GroupSchema("user", 1, ("a", "b"))
SPEC = AssemblerSpec(groups=(GROUP,), features=(FeatureRef("user", "a"), FeatureRef("user", "b")))
W = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
BIAS = [0.5, -0.5]


def expected(i: int) -> list[float]:
    return (np.array([i, -i], np.float32) @ W + np.array(BIAS, np.float32)).tolist()


# -- certificates ---------------------------------------------------------------------------


class Certs:
    def __init__(self, root: Path) -> None:
        self.root = root

    def __getitem__(self, name: str) -> str:
        return str(self.root / name)


def trusting(ca: str, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """What httpx verifies with: ``ca``'s certificates, optionally a client certificate."""
    context = ssl.create_default_context(cafile=ca)
    if cert:
        context.load_cert_chain(cert, key)
    return context


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """ca.pem signs server.pem (localhost, 127.0.0.1) and client.pem; other.pem is an
    unrelated self-signed certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    d = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"]
    _openssl(
        "req", "-x509", *ec, "-subj", "/CN=test-ca", "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.pem"
    )
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, ext in (("server", ["-extfile", f"{d}/server.ext"]), ("client", [])):
        _openssl(
            "req",
            *ec,
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{d}/{name}.key",
            "-out",
            f"{d}/{name}.csr",
        )
        _openssl(
            "x509", "-req", "-in", f"{d}/{name}.csr", "-CA", f"{d}/ca.pem", "-CAkey", f"{d}/ca.key",
            "-CAcreateserial", "-days", "2", *ext, "-out", f"{d}/{name}.pem",
        )  # fmt: skip
    _openssl(
        "req", "-x509", *ec, "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
        "-keyout", f"{d}/other.key", "-out", f"{d}/other.pem",
    )  # fmt: skip
    return Certs(d)


# -- servers --------------------------------------------------------------------------------


def _serve(tmp: Path, auth: FrontAuth | None) -> AbstractContextManager[GatewayServer]:
    """Model "scorer" (entities u0 … u9 in the store) on both fronts, with ``auth``."""
    engine = scorer_engine(tmp, SPEC, W, BIAS, store=DictStore.users(10))
    return running_gateway(engine, auth=auth)


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    with _serve(tmp_path_factory.mktemp("tok"), FrontAuth(tokens=(TOKEN, OTHER_TOKEN))) as server:
        yield server


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[GatewayServer]:
    auth = FrontAuth(tokens=(TOKEN,), tls_cert=certs["server.pem"], tls_key=certs["server.key"])
    with _serve(tmp_path_factory.mktemp("tls"), auth) as server:
        yield server


def grpc_addr(server: GatewayServer) -> str:
    return f"127.0.0.1:{server.grpc_port}"


def http_url(server: GatewayServer, scheme: str = "http") -> str:
    host = "localhost" if scheme == "https" else "127.0.0.1"
    return f"{scheme}://{host}:{server.http_port}"


def predict_u3(channel: grpc.Channel, token: str | None) -> predict_pb2.PredictResponse:
    request = predict_pb2.PredictRequest(model="scorer", entity_ids=["u3"])
    response: predict_pb2.PredictResponse = predict_stub(channel)(
        request, timeout=10, metadata=bearer_metadata(token)
    )
    return response


def assert_unauthenticated(exc: grpc.RpcError) -> None:
    assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc.details()
    details = exc.details() or ""
    assert "token" in details
    for secret in (TOKEN, OTHER_TOKEN, WRONG):
        assert secret not in details  # neither the configured nor the presented token


# -- bearer tokens, gRPC --------------------------------------------------------------------


def test_grpc_predict_needs_an_accepted_token(token_server: GatewayServer) -> None:
    with grpc.insecure_channel(grpc_addr(token_server)) as channel:
        for token in (None, WRONG, TOKEN + "x", TOKEN[:-1]):
            with pytest.raises(grpc.RpcError) as err:
                predict_u3(channel, token)
            assert_unauthenticated(err.value)
        with pytest.raises(grpc.RpcError) as err:
            predict_stub(channel)(
                predict_pb2.PredictRequest(model="scorer", entity_ids=["u3"]),
                timeout=10,
                metadata=(("authorization", f"Basic {TOKEN}"),),
            )
        assert_unauthenticated(err.value)
        for token in (TOKEN, OTHER_TOKEN):
            r = predict_u3(channel, token)
            assert list(r.predictions[0].values) == pytest.approx(expected(3))


def test_grpc_kserve_needs_the_token_and_health_stays_open(token_server: GatewayServer) -> None:
    client = triton.InferenceServerClient(grpc_addr(token_server))
    try:
        entity = triton.InferInput("entity_ids", [1], "BYTES")
        entity.set_data_from_numpy(np.array([b"u5"], dtype=np.object_))
        for headers in (None, {"authorization": f"Bearer {WRONG}"}):
            with pytest.raises(InferenceServerException) as err:
                client.infer("scorer", [entity], headers=headers)
            assert err.value.status() == "StatusCode.UNAUTHENTICATED"
            with pytest.raises(InferenceServerException) as err:
                client.is_server_live(headers=headers)
            assert err.value.status() == "StatusCode.UNAUTHENTICATED"
        good = {"authorization": f"Bearer {TOKEN}"}
        assert client.is_server_live(headers=good)
        result = client.infer("scorer", [entity], headers=good)
        assert result.as_numpy("predictions")[0].tolist() == pytest.approx(expected(5))
    finally:
        client.close()
    with grpc.insecure_channel(grpc_addr(token_server)) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
        assert status == health_pb2.HealthCheckResponse.SERVING


# -- bearer tokens, HTTP --------------------------------------------------------------------


def test_http_needs_the_token_except_probes(token_server: GatewayServer) -> None:
    base = http_url(token_server)
    body = {"entity_ids": ["u3"]}
    kserve_body = {
        "inputs": [{"name": "entity_ids", "datatype": "BYTES", "shape": [1], "data": ["u3"]}]
    }
    for headers in ({}, {"authorization": f"Bearer {WRONG}"}, {"authorization": TOKEN}):
        for method, path, payload in (
            ("POST", "/predict/scorer", body),
            ("POST", "/v2/models/scorer/infer", kserve_body),
            ("GET", "/v2/models/scorer", None),
            ("GET", "/v2/health/ready", None),
        ):
            r = httpx.request(method, base + path, json=payload, headers=headers, timeout=10)
            assert r.status_code == 401, (path, headers, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer")
            refusal = r.json()
            if path.startswith("/v2/"):  # Triton's shape
                message = refusal["error"]
            else:
                assert refusal["error"] == "UNAUTHENTICATED"
                message = refusal["message"]
            assert "token" in message or "Bearer" in message
            assert TOKEN not in r.text and WRONG not in r.text
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(base + path, timeout=10).status_code == 200, path
    for token in (TOKEN, OTHER_TOKEN):
        auth = {"authorization": f"Bearer {token}"}
        r = httpx.post(base + "/predict/scorer", json=body, headers=auth, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["values"] == pytest.approx(expected(3))
        r = httpx.post(base + "/v2/models/scorer/infer", json=kserve_body, headers=auth, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == pytest.approx(expected(3))


def test_client_and_cli_send_the_token(token_server: GatewayServer) -> None:
    for gateway in (f"grpc://{grpc_addr(token_server)}", http_url(token_server)):
        with (
            carrara.Client("http://127.0.0.1:9", gateway=gateway) as anonymous,
            pytest.raises(errors.UnauthenticatedError),
        ):
            anonymous.predict("scorer", ["u3"])
        with carrara.Client("http://127.0.0.1:9", gateway=gateway, gateway_token=TOKEN) as client:
            result = client.predict("scorer", ["u3", "u4"])
            np.testing.assert_allclose(result.outputs, [expected(3), expected(4)], rtol=1e-6)

    env = {k: v for k, v in os.environ.items() if k != "CARRARA_GATEWAY_TOKEN"}
    for target in (f"grpc://{grpc_addr(token_server)}", http_url(token_server)):
        cmd = [sys.executable, "-m", "carrara", "predict", "scorer", "u3", "--target", target]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 1 and "UNAUTHENTICATED" in out.stderr, out.stderr
        out = subprocess.run(
            [*cmd, "--token", TOKEN], capture_output=True, text=True, timeout=60, env=env
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["predictions"][0]["values"] == pytest.approx(expected(3))
        out = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, "CARRARA_GATEWAY_TOKEN": OTHER_TOKEN},
        )
        assert out.returncode == 0, out.stderr


# -- TLS ------------------------------------------------------------------------------------


def test_grpc_tls_trusting_the_ca_works_plaintext_fails(
    tls_server: GatewayServer, certs: Certs
) -> None:
    target = f"grpcs://localhost:{tls_server.grpc_port}"
    with open_channel(target, root_certificates=certs["ca.pem"]) as channel:
        r = predict_u3(channel, TOKEN)
        assert list(r.predictions[0].values) == pytest.approx(expected(3))
        with pytest.raises(grpc.RpcError) as err:
            predict_u3(channel, None)  # TLS does not replace the token
        assert_unauthenticated(err.value)
    with grpc.insecure_channel(grpc_addr(tls_server)) as plain:
        with pytest.raises(grpc.RpcError) as err:
            predict_u3(plain, TOKEN)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with open_channel(target, root_certificates=certs["other.pem"]) as untrusted:
        with pytest.raises(grpc.RpcError) as err:
            predict_u3(untrusted, TOKEN)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_http_tls_trusting_the_ca_works_plaintext_fails(
    tls_server: GatewayServer, certs: Certs
) -> None:
    auth = {"authorization": f"Bearer {TOKEN}"}
    url = http_url(tls_server, "https") + "/predict/scorer"
    r = httpx.post(
        url, json={"entity_ids": ["u3"]}, headers=auth, verify=trusting(certs["ca.pem"]), timeout=10
    )
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["values"] == pytest.approx(expected(3))
    with pytest.raises(httpx.TransportError):
        httpx.post(
            http_url(tls_server) + "/predict/scorer",
            json={"entity_ids": ["u3"]},
            headers=auth,
            timeout=10,
        )
    with pytest.raises(httpx.ConnectError):  # the system's roots do not know our CA
        httpx.post(url, json={"entity_ids": ["u3"]}, headers=auth, timeout=10)


def test_client_over_tls(tls_server: GatewayServer, certs: Certs) -> None:
    for gateway in (
        f"grpcs://localhost:{tls_server.grpc_port}",
        http_url(tls_server, "https"),
    ):
        with carrara.Client(
            "http://127.0.0.1:9",
            gateway=gateway,
            gateway_token=TOKEN,
            gateway_tls_ca=certs["ca.pem"],
        ) as client:
            np.testing.assert_allclose(client.predict("scorer", ["u7"]).outputs, [expected(7)])


def test_mutual_tls(tmp_path: Path, certs: Certs) -> None:
    auth = FrontAuth(
        tls_cert=certs["server.pem"], tls_key=certs["server.key"], tls_client_ca=certs["ca.pem"]
    )
    with _serve(tmp_path, auth) as server:
        target = f"localhost:{server.grpc_port}"
        ca = Path(certs["ca.pem"]).read_bytes()
        with_cert = grpc.ssl_channel_credentials(
            ca, Path(certs["client.key"]).read_bytes(), Path(certs["client.pem"]).read_bytes()
        )
        with grpc.secure_channel(target, with_cert) as channel:
            assert list(predict_u3(channel, None).predictions[0].values) == pytest.approx(
                expected(3)
            )
        for key, cert in ((None, None), (certs["other.key"], certs["other.pem"])):
            creds = grpc.ssl_channel_credentials(
                ca,
                Path(key).read_bytes() if key else None,
                Path(cert).read_bytes() if cert else None,
            )
            with grpc.secure_channel(target, creds) as channel:
                with pytest.raises(grpc.RpcError) as err:
                    predict_u3(channel, None)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        url = http_url(server, "https") + "/predict/scorer"
        r = httpx.post(
            url,
            json={"entity_ids": ["u3"]},
            verify=trusting(certs["ca.pem"], certs["client.pem"], certs["client.key"]),
            timeout=10,
        )
        assert r.status_code == 200, r.text
        with pytest.raises(httpx.TransportError):
            httpx.post(
                url, json={"entity_ids": ["u3"]}, verify=trusting(certs["ca.pem"]), timeout=10
            )


def test_bad_tls_files_fail_at_start(tmp_path: Path, certs: Certs) -> None:
    with pytest.raises(errors.ConfigError):
        FrontAuth(tls_cert=certs["server.pem"])  # no key
    with pytest.raises(errors.ConfigError):
        FrontAuth(tokens=(TOKEN,), tls_client_ca=certs["ca.pem"])  # client CA without TLS
    mismatched = FrontAuth(tls_cert=certs["server.pem"], tls_key=certs["other.key"])
    with pytest.raises(errors.UnavailableError, match="TLS"), _serve(tmp_path, mismatched):
        pass


# -- default, configuration and plumbing ----------------------------------------------------


def test_default_gateway_is_open(tmp_path: Path) -> None:
    with _serve(tmp_path, None) as server:
        assert not server.auth.enabled
        with grpc.insecure_channel(grpc_addr(server)) as channel:
            assert list(predict_u3(channel, None).predictions[0].values) == pytest.approx(
                expected(3)
            )
        r = httpx.post(
            http_url(server) + "/predict/scorer", json={"entity_ids": ["u3"]}, timeout=10
        )
        assert r.status_code == 200


def test_gateway_yaml_auth(tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text(f"# gateway clients\n{TOKEN}\n\n  {OTHER_TOKEN}  \n")
    (tmp_path / "g.yaml").write_text(
        "auth:\n  tokens_file: tokens\n  token_env: GW_TOKEN\n"
        "  tls_cert: tls/cert.pem\n  tls_key: /abs/key.pem\n"
    )
    config = load_gateway_config(tmp_path / "g.yaml")
    assert config.auth is not None
    assert config.auth.tokens_file == str(tmp_path / "tokens")
    assert config.auth.tls_cert == str(tmp_path / "tls" / "cert.pem")
    assert config.auth.tls_key == "/abs/key.pem"
    auth = config.auth.resolve({"GW_TOKEN": "from-env"})
    assert auth.tokens == ("from-env", TOKEN, OTHER_TOKEN)
    assert auth.tls and "TLS" in auth.describe()
    for text in (repr(auth), auth.describe(), repr(config)):
        assert TOKEN not in text and "from-env" not in text
    with pytest.raises(errors.ConfigError, match="GW_TOKEN"):
        config.auth.resolve({})  # asked for, unset: refuse to start without it
    (tmp_path / "empty.yaml").write_text("auth: {}\n")
    with pytest.raises(errors.ConfigError, match="auth needs"):
        load_gateway_config(tmp_path / "empty.yaml")
    (tmp_path / "none.yaml").write_text("{}\n")
    assert load_gateway_config(tmp_path / "none.yaml").auth is None  # the default: off


def test_settings_and_up_urls(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        env={
            "CARRARA_GATEWAY_TOKEN": TOKEN,
            "CARRARA_GATEWAY_TLS_CERT": "/c.pem",
            "CARRARA_GATEWAY_TLS_KEY": "/k.pem",
            "CARRARA_ONLINE_STORE_URL": "redis://127.0.0.1:1/0",
            "CARRARA_EVENT_LOG_URL": f"local:///{tmp_path}/events.db",
            "CARRARA_HOME": str(tmp_path),
        },
    )
    assert settings.gateway_token == TOKEN
    services = Services(settings, UpConfig(api_port=1, gateway_http_port=2, gateway_grpc_port=3))
    assert services.gateway_url == "https://127.0.0.1:2"
    assert services.grpc_url == "grpcs://127.0.0.1:3"
    with pytest.raises(errors.ConfigError, match="go together"):
        load_settings(None, env={"CARRARA_GATEWAY_TLS_CERT": "/c.pem"})


def test_carrara_serve_with_auth_from_yaml(tmp_path: Path, certs: Certs) -> None:
    """The real command: auth from the YAML (token from an environment variable, TLS files)
    reaches both fronts. Its store is memory:// and empty: u3 gets the defaults (0, 0)."""
    model = write_linear_model(tmp_path / "m.onnx", W, BIAS)
    config = {
        "models": [
            {
                "name": "scorer",
                "policy": {"variants": [{"name": "v3", "weight_bp": 10_000}]},
                "variants": [
                    {
                        "name": "v3",
                        "version": 3,
                        "artifact": str(model),
                        "features": {
                            "groups": [{"name": "user", "version": 1, "features": ["a", "b"]}],
                            "features": [
                                {"group": "user", "feature": "a"},
                                {"group": "user", "feature": "b"},
                            ],
                        },
                    }
                ],
            }
        ],
        "auth": {
            "token_env": "MY_GATEWAY_TOKEN",
            "tls_cert": certs["server.pem"],
            "tls_key": certs["server.key"],
        },
    }
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(config))
    grpc_port, http_port = free_port(), free_port()
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARRARA_")}
    argv = [
        "serve", "--config", str(tmp_path / "g.yaml"),
        "--grpc-port", str(grpc_port), "--http-port", str(http_port),
    ]  # fmt: skip
    with serve_process(
        argv,
        http_port,
        log=log,
        env={**env, "MY_GATEWAY_TOKEN": TOKEN},
        verify=trusting(certs["ca.pem"]),
        timeout_s=60,
    ):
        with open_channel(
            f"grpcs://localhost:{grpc_port}", root_certificates=certs["ca.pem"]
        ) as ch:
            assert list(predict_u3(ch, TOKEN).predictions[0].values) == pytest.approx(expected(0))
            with pytest.raises(grpc.RpcError) as err:
                predict_u3(ch, WRONG)
            assert_unauthenticated(err.value)
        r = httpx.post(
            f"https://localhost:{http_port}/predict/scorer",
            json={"entity_ids": ["u3"]},
            verify=trusting(certs["ca.pem"]),
            timeout=10,
        )
        assert r.status_code == 401
    text = log.read_text()
    assert "auth: bearer tokens (1), TLS" in text
    assert TOKEN not in text


def test_up_gateway_child_takes_auth_from_settings(tmp_path: Path, certs: Certs) -> None:
    """``carrara up``'s gateway child (``python -m carrara.up _gateway``) reads
    ``CARRARA_GATEWAY_TOKEN`` / ``_TLS_CERT`` / ``_TLS_KEY`` like every other setting."""
    settings = load_settings(
        None,
        env={
            "CARRARA_HOME": str(tmp_path),
            "CARRARA_ONLINE_STORE_URL": "memory://",
            "CARRARA_GATEWAY_TOKEN": TOKEN,
            "CARRARA_GATEWAY_TLS_CERT": certs["server.pem"],
            "CARRARA_GATEWAY_TLS_KEY": certs["server.key"],
        },
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARRARA_")}
    env.update(settings_env(settings))
    grpc_port, http_port = free_port(), free_port()
    log = tmp_path / "gateway.log"
    argv = [
        "_gateway", "--grpc-port", str(grpc_port),
        "--http-port", str(http_port), "--state-dir", str(tmp_path / "state"),
    ]  # fmt: skip
    ca = trusting(certs["ca.pem"])
    with serve_process(
        argv,
        http_port,
        log=log,
        env=env,
        python_args=("-m", "carrara.up"),
        ready_path="/healthz",
        verify=ca,
        timeout_s=60,
        check_exit=False,  # only its auth is checked here
    ):
        client = triton.InferenceServerClient(
            f"localhost:{grpc_port}", ssl=True, root_certificates=certs["ca.pem"]
        )
        try:
            with pytest.raises(InferenceServerException) as err:
                client.is_server_live()
            assert err.value.status() == "StatusCode.UNAUTHENTICATED"
            assert client.is_server_live(headers={"authorization": f"Bearer {TOKEN}"})
        finally:
            client.close()
        url = f"https://localhost:{http_port}/v2/health/live"
        assert httpx.get(url, verify=ca).status_code == 401
        assert httpx.get(url, verify=ca, headers={"authorization": f"Bearer {TOKEN}"}).is_success
    text = log.read_text()
    assert "auth: bearer tokens (1), TLS" in text, text
    assert TOKEN not in text
