"""``carrara serve`` (run the gateway) and ``carrara predict`` (call one)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

__all__ = ["register"]


def register(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the serving gateway (gRPC + HTTP)")
    serve.add_argument("--config", required=True, help="gateway YAML: models, stores, limits")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--http-port", type=int, default=8000)
    serve.set_defaults(func=_serve)

    predict = sub.add_parser("predict", help="ask a running gateway for predictions")
    predict.add_argument("model")
    predict.add_argument("entity_ids", nargs="+")
    predict.add_argument(
        "--target",
        default="http://127.0.0.1:8000",
        help="http[s]://host:port or grpc[s]://host:port of the gateway (s: TLS)",
    )
    predict.add_argument(
        "--token",
        default=None,
        help="bearer token of a gateway with auth on (default: $CARRARA_GATEWAY_TOKEN)",
    )
    predict.add_argument(
        "--tls-ca",
        default=None,
        metavar="PEM",
        help="CA certificate(s) to trust for https:// or grpcs:// (default: the system's)",
    )
    predict.add_argument(
        "--override", action="append", default=[], metavar="FEATURE=VALUE", help="feature override"
    )
    predict.add_argument("--timeout", type=float, default=10.0)
    predict.set_defaults(func=_predict)


def _serve(args: argparse.Namespace) -> int:

    from carrara.gateway.config import build_backends, load_gateway_config
    from carrara.gateway.embedded import serving_store
    from carrara.gateway.engine import ServingEngine
    from carrara.gateway.server import GatewayServer, serve_until_signalled
    from carrara.gateway.service import Gateway

    config = load_gateway_config(args.config)
    # Auth first: a token_env that is unset fails before anything is loaded.
    auth = config.auth.resolve(os.environ) if config.auth is not None else None
    from carrara.core import FeatureCache
    from carrara.feature_cache.online_store import open_online_store

    store = open_online_store(config.online_store_url)
    logger = None
    event_log = None
    if config.event_log_url:
        from carrara.eventlog import open_event_log
        from carrara.gateway.prediction_log import PredictionLogger

        event_log = open_event_log(config.event_log_url)
        logger = PredictionLogger(event_log)
    engine = ServingEngine(
        serving_store(store),
        cache=FeatureCache(capacity=config.cache_capacity, ttl_seconds=config.cache_ttl_seconds),
        sink=logger,
        max_in_flight=config.max_in_flight,
        max_batch=config.max_batch,
        store_deadline_s=config.store_deadline_s,
    )
    unavailable: dict[str, str] = {}
    for model in config.models:
        # One model that does not load is reported unavailable; the others serve.
        try:
            engine.deploy(model.deployment(), build_backends(model))
        except Exception as exc:
            print(f"carrara gateway: model {model.name} is unavailable: {exc}", file=sys.stderr)
            unavailable[model.name] = str(exc)
    follower = deployment_events = None
    if config.registry is not None:
        from carrara.eventlog import open_event_log
        from carrara.gateway.registry_source import DeploymentFollower
        from carrara.registry.artifacts import ArtifactStore

        deployment_events = open_event_log(config.registry.event_log_url)
        follower = DeploymentFollower(
            engine,
            deployment_events,
            ArtifactStore(config.registry.artifact_path),
            state_dir=config.registry.state_dir,
            models=config.registry.models,
        )
        follower.restore()  # the last good state, before (and without) any event
        follower.start()
    gateway = Gateway(
        engine,
        follower=follower,
        max_staleness_s=config.registry.max_staleness_s if config.registry else None,
    )
    gateway.unavailable.update(unavailable)
    server = GatewayServer(
        gateway, host=args.host, grpc_port=args.grpc_port, http_port=args.http_port, auth=auth
    )

    try:
        serve_until_signalled(server, engine.models)
    finally:
        if follower is not None:
            follower.stop()
        gateway.close()
        if deployment_events is not None:
            deployment_events.close()
        if logger is not None:
            logger.close()
        if event_log is not None:
            event_log.close()
        store.close()
    return 0


def _predict(args: argparse.Namespace) -> int:
    from carrara.errors import InvalidArgumentError

    overrides: dict[str, float] = {}
    for item in args.override:
        name, sep, value = item.partition("=")
        try:
            overrides[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise InvalidArgumentError(f"--override wants FEATURE=NUMBER, got {item!r}")
    target: str = args.target
    token = args.token or os.environ.get("CARRARA_GATEWAY_TOKEN") or None
    if target.startswith(("grpc://", "grpcs://")):
        import grpc

        from carrara.gateway.grpc_client import bearer_metadata, open_channel, predict_stub
        from carrara.v1 import predict_pb2

        with open_channel(target, root_certificates=args.tls_ca) as channel:
            call = predict_stub(channel)
            request = predict_pb2.PredictRequest(
                model=args.model,
                entity_ids=args.entity_ids,
                overrides=[
                    predict_pb2.FeatureOverride(name=k, values=[v]) for k, v in overrides.items()
                ],
            )
            try:
                r = call(request, timeout=args.timeout, metadata=bearer_metadata(token))
            except grpc.RpcError as exc:
                print(f"carrara: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
                return 1
            body = {
                "model": r.model,
                "request_id": r.request_id,
                "latency_us": r.latency_us,
                "degraded": r.degraded,
                "predictions": [
                    {
                        "entity_id": p.entity_id,
                        "values": list(p.values),
                        "variant": p.variant,
                        "model_version": p.model_version,
                        "degraded": p.degraded,
                    }
                    for p in r.predictions
                ],
            }
    else:
        import ssl

        import httpx

        payload: dict[str, Any] = {"entity_ids": args.entity_ids}
        if overrides:
            payload["overrides"] = overrides
        response = httpx.post(
            f"{target.rstrip('/')}/predict/{args.model}",
            json=payload,
            timeout=args.timeout,
            headers={"authorization": f"Bearer {token}"} if token else None,
            verify=ssl.create_default_context(cafile=args.tls_ca) if args.tls_ca else True,
        )
        body = response.json()
        if response.status_code != 200:
            print(f"carrara: error: {body.get('error')}: {body.get('message')}", file=sys.stderr)
            return 1
    print(json.dumps(body, indent=2))
    return 0
