"""`memsvc serve` and `memsvc tenants create`: the operator's side of the service.

memsvc serve                                    # embedded: SQLite, reference model
memsvc serve --database-url postgresql+psycopg://... --redis-url redis://...
memsvc serve --metrics-port 9464 --canary-interval 300   # /metrics, a recall canary
memsvc serve --admin-key-file /run/secrets/admin        # AdminService on
memsvc tenants create acme                      # prints the tenant's API key, once

Flags fall back on DATABASE_URL, REDIS_URL, MEMSVC_DATA_DIR, MEMSVC_METRICS_PORT and
MEMSVC_ADMIN_KEY. The data directory defaults to one per user (memsvc/settings.py), so
`serve` and `tenants create` agree wherever they are run from; both print it at startup.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
from pathlib import Path

from memsvc.sessions.config import MAX_TOKENS_PER_APPEND
from memsvc.sessions.ownership import DEFAULT_LEASE_TTL_MS
from memsvc.settings import (
    MODEL_HELP,
    add_admin_key_flags,
    add_data_dir_flag,
    announce,
    data_dir_line,
    model_dir,
    resolve_admin_key,
)

# Off unless asked for: a fixed default port made a second server on one host collide.
METRICS_PORT_ENV = "MEMSVC_METRICS_PORT"


def add_store_flags(parser: argparse.ArgumentParser) -> None:
    """--data-dir and --database-url, shared by every command that opens the metadata store."""
    add_data_dir_flag(parser)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL"),
        help="PostgreSQL instead of the embedded SQLite ($DATABASE_URL)",
    )


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the gRPC server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--address", default="0.0.0.0:50051", help="host:port to listen on")
    serve.add_argument("--model", type=model_dir, default="default", help=MODEL_HELP)
    add_store_flags(serve)
    serve.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL"), help="shared hot state ($REDIS_URL)"
    )
    serve.add_argument("--redis-namespace", default="memsvc", help="prefix of the Redis keys")
    serve.add_argument("--node-id", default=socket.gethostname(), help="this replica's name")
    serve.add_argument(
        "--advertise-address",
        help="host:port other replicas send this replica's sessions' clients to "
        "(default: --address, with a wildcard host replaced by this host's name)",
    )
    serve.add_argument(
        "--lease-ttl-ms",
        type=int,
        default=DEFAULT_LEASE_TTL_MS,
        help="session lease TTL: how long a dead replica's sessions wait to move",
    )
    serve.add_argument("--tls-cert", type=Path, help="PEM certificate chain (TLS with --tls-key)")
    serve.add_argument("--tls-key", type=Path, help="PEM private key")
    serve.add_argument("--max-message-bytes", type=int, default=4 << 20)
    serve.add_argument("--max-tokens-per-request", type=int, default=MAX_TOKENS_PER_APPEND)
    serve.add_argument("--device-budget-mb", type=int, default=2048, help="resident state bytes")
    serve.add_argument("--checkpoint-every-tokens", type=int, default=65536)
    serve.add_argument("--shutdown-grace", type=float, default=10.0, help="seconds (SIGTERM)")
    serve.add_argument("--device", default="cpu")
    serve.add_argument("--threads", type=int, default=None, help="torch threads (all cores)")
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get(METRICS_PORT_ENV) or 0),
        help=f"serve Prometheus /metrics on this port (9464 is the convention); 0: off "
        f"(${METRICS_PORT_ENV})",
    )
    add_admin_key_flags(serve)
    serve.add_argument(
        "--canary-interval",
        type=float,
        default=0.0,
        help="seconds between recall canary rounds (an internal tenant); 0: off",
    )
    serve.add_argument(
        "--guard-window-tokens",
        type=int,
        default=None,
        help="tokens over which the session guards measure growth (4096)",
    )
    serve.add_argument(
        "--guard-norm-bound",
        type=float,
        default=None,
        help="memory norm the guards call saturated (default: the model's guards.json "
        "calibration, else 8x a fresh memory's norm)",
    )
    serve.add_argument(
        "--guard-input-entropy",
        type=_entropy_band,
        default=None,
        metavar="LOW,HIGH",
        help="bits per byte of a session's latest input outside which its writes are "
        "damped (default: the model's guards.json, else 0.5,7.5; 0,inf: off)",
    )
    serve.add_argument(
        "--segment-tokens",
        type=int,
        default=256,
        help="a bulk append takes turns with other work in segments of this many tokens",
    )
    serve.add_argument(
        "--step-tokens",
        type=int,
        default=1024,
        help="work per scheduler step, in appended tokens (a sampled token counts 16)",
    )
    serve.add_argument(
        "--max-new-tokens",
        type=int,
        default=4096,
        help="the most tokens one Query or Generate may ask for (RESOURCE_EXHAUSTED past it)",
    )
    serve.add_argument(
        "--max-generations-per-tenant",
        type=int,
        default=4,
        help="Queries and Generates one tenant may run at once (RESOURCE_EXHAUSTED past it)",
    )
    serve.set_defaults(func=run_serve)


def add_tenants_parser(commands: argparse._SubParsersAction) -> None:
    tenants = commands.add_parser("tenants", help="tenants and their API keys")
    actions = tenants.add_subparsers(dest="tenants", required=True)
    create = actions.add_parser("create", help="create a tenant; prints its API key once")
    create.add_argument("name")
    create.add_argument("--max-sessions", type=int, default=100)
    create.add_argument("--tokens-per-minute", type=int, default=1_000_000)
    create.add_argument("--json", action="store_true", help="print one JSON object")
    add_store_flags(create)
    create.set_defaults(func=run_tenants_create)


def advertised(address: str) -> str:
    """The address other replicas give clients: ``address`` with a wildcard host replaced."""
    host, _, port = address.rpartition(":")
    if host in ("0.0.0.0", "[::]", "::", ""):
        host = socket.gethostname()
    return f"{host}:{port}"


def run_serve(args: argparse.Namespace) -> int:
    import torch

    from memsvc.obs.metrics import ServiceMetrics
    from memsvc.obs.thresholds import default_guard_config, read_calibration
    from memsvc.runtime import tune_allocator
    from memsvc.server.app import MemoryServer, ServerConfig
    from memsvc.server.backends import SetupError, load_engine, open_database, open_tracker
    from memsvc.server.scheduler import SchedulerConfig
    from memsvc.sessions.manager import ManagerConfig, SessionManager

    if args.threads:
        torch.set_num_threads(args.threads)
    tune_allocator()
    try:
        admin_key = resolve_admin_key(args)
        for path in (args.tls_cert, args.tls_key):
            if path is not None and not path.is_file():
                raise SetupError(f"no such file: {path}")
        config = ServerConfig(
            address=args.address,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            admin_key=admin_key.value,
            max_message_bytes=args.max_message_bytes,
            shutdown_grace_s=args.shutdown_grace,
            metrics_port=args.metrics_port,
            canary_interval_s=args.canary_interval,
            scheduling=SchedulerConfig(
                segment_tokens=args.segment_tokens,
                step_tokens=args.step_tokens,
                max_new_tokens=args.max_new_tokens,
                max_generations_per_tenant=args.max_generations_per_tenant,
            ),
        )
        engine = load_engine(args.model, args.device)
        overrides = {
            "window_tokens": args.guard_window_tokens,
            "norm_bound": args.guard_norm_bound,
            **_band_fields(args.guard_input_entropy),
        }
        guard_config = default_guard_config(
            engine,
            read_calibration(args.model),
            **{name: value for name, value in overrides.items() if value is not None},
        )
        database = open_database(args.data_dir, args.database_url)
        tracker = open_tracker(args.redis_url, args.redis_namespace)
    except (SetupError, ValueError) as error:
        print(f"memsvc serve: {error}", file=sys.stderr)
        return 2
    for line in _startup_lines(args, admin_key.line("serve")):
        announce(line)
    metrics = ServiceMetrics()
    manager = SessionManager(
        ManagerConfig(
            data_dir=args.data_dir,
            node_id=args.node_id,
            advertise_address=args.advertise_address or advertised(args.address),
            lease_ttl_ms=args.lease_ttl_ms,
            device_budget_bytes=args.device_budget_mb << 20,
            checkpoint_every_tokens=args.checkpoint_every_tokens,
            max_tokens_per_append=args.max_tokens_per_request,
        ),
        engine=engine,
        database=database,
        tracker=tracker,
        observer=metrics,
    )
    server = MemoryServer(
        manager,
        database,
        config,
        engine.model.config.vocab_size,
        metrics=metrics,
        guard_config=guard_config,
    )
    try:
        asyncio.run(server.serve_until_signalled())
    finally:
        database.dispose()
    return 0


def _startup_lines(args: argparse.Namespace, admin_line: str) -> list[str]:
    """What a newcomer needs to know before the first request: where, what, what is on."""
    metrics = (
        f"memsvc serve: metrics on port {args.metrics_port} (/metrics)"
        if args.metrics_port
        else "memsvc serve: metrics off (--metrics-port PORT to serve /metrics)"
    )
    return [
        f"memsvc serve: gRPC on {args.address}, model {args.model}",
        data_dir_line("serve", args.data_dir),
        admin_line,
        metrics,
    ]


def run_tenants_create(args: argparse.Namespace) -> int:
    from memsvc.server.backends import SetupError, open_database
    from memsvc.store import metadata
    from memsvc.store.errors import AlreadyExistsError

    if args.database_url is None:
        announce(data_dir_line("tenants create", args.data_dir))
    try:
        database = open_database(args.data_dir, args.database_url)
    except SetupError as error:
        print(f"memsvc tenants create: {error}", file=sys.stderr)
        return 2
    try:
        with database.unit_of_work() as db:
            tenant, api_key = metadata.create_tenant(
                db,
                args.name,
                max_sessions=args.max_sessions,
                tokens_per_minute=args.tokens_per_minute,
            )
    except (AlreadyExistsError, ValueError) as error:
        print(f"memsvc tenants create: {error}", file=sys.stderr)
        return 1
    finally:
        database.dispose()
    if args.json:
        print(json.dumps({"tenant_id": tenant.id, "name": tenant.name, "api_key": api_key}))
    else:
        print(f"tenant {tenant.name} ({tenant.id})")
        print(f"API key (shown once, store it): {api_key}")
    return 0


def _entropy_band(text: str) -> tuple[float, float]:
    low, sep, high = text.partition(",")
    try:
        band = (float(low), float(high))
    except ValueError:
        band = (-1.0, -1.0)
    if not sep or not 0 <= band[0] < band[1]:
        raise argparse.ArgumentTypeError(
            f"bad entropy band {text!r}: LOW,HIGH with 0 <= LOW < HIGH"
        )
    return band


def _band_fields(band: tuple[float, float] | None) -> dict[str, float | None]:
    if band is None:
        return {"min_input_entropy": None, "max_input_entropy": None}
    return {"min_input_entropy": band[0], "max_input_entropy": band[1]}
