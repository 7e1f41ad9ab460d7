"""The `latency-sidecar` command: run, demo, check-config, events, fleet, analyze."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from . import __version__
from .config import (
    ConfigError,
    HostPort,
    Settings,
    load_settings,
    parse_host_port,
    unknown_variables,
)
from .eventloop import run_async
from .listeners import StartupError, listening
from .logs import flush_logging, setup_logging
from .signals import StopSignals

if TYPE_CHECKING:
    from aiohttp import web

EXIT_CONFIG = 2


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    return load_settings(
        upstream_url=getattr(args, "upstream", None),
        listen=getattr(args, "listen", None),
        admin_listen=getattr(args, "admin_listen", None),
        **extra,
    )


def cmd_run(args: argparse.Namespace) -> int:
    from .server import serve

    settings = _settings(args)
    setup_logging(settings.log_level, settings.log_format)
    for warning in unknown_variables():
        logging.getLogger("sidecar.config").warning(warning)
    try:
        return run_async(serve(settings))
    finally:
        flush_logging()


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    for warning in unknown_variables():
        print(f"warning: {warning}", file=sys.stderr)
    width = max(len(k) for k in settings.masked())
    print("configuration OK; effective settings:")
    for key, value in settings.masked().items():
        print(f"  {key:<{width}} = {value}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo

    setup_logging("warning", "text")
    if args.replicas > 1:  # a fleet of sidecars sharing through Redis
        from .demo.fleet import run_fleet_demo

        try:
            return run_async(
                run_fleet_demo(
                    replicas=args.replicas,
                    duration=args.duration,
                    rps=args.rps,
                    refresh_s=args.refresh,
                )
            )
        finally:
            flush_logging()
    try:
        return run_async(
            run_demo(
                duration=args.duration,
                rps=args.rps,
                refresh_s=args.refresh,
                listen=args.listen,
                admin_listen=args.admin_listen,
            )
        )
    finally:
        flush_logging()


def host_port(value: str) -> HostPort:
    """argparse type for the demo servers' ``--listen``: a bad value is a usage error."""
    try:
        return parse_host_port(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def serve_until_stopped(name: str, where: HostPort, app: Callable[[], web.Application]) -> int:
    """The demo servers' main: serve ``app()`` on ``--listen`` until SIGTERM or SIGINT.
    A port that cannot be bound is one line and exit 2."""
    from aiohttp import web

    async def main() -> int:
        async with StopSignals() as stop:
            runner = web.AppRunner(app(), access_log=None)
            async with listening(runner, where, "--listen", backlog=128) as port:
                print(f"{name} listening on {where._replace(port=port)}", flush=True)
                await stop.wait()
        return 0

    setup_logging("info", "json")
    try:
        return run_async(main())
    finally:
        flush_logging()


def cmd_demo_gateway(args: argparse.Namespace) -> int:
    from .demo.gateway import DemoGateway
    from .demo.run import SCHEDULE

    schedule = SCHEDULE if args.slowdowns else None
    delay_s = args.add_delay_ms / 1000
    return serve_until_stopped(
        "demo gateway",
        args.listen,
        lambda: DemoGateway(args.seed, schedule=schedule, extra_delay_s=delay_s).app(),
    )


def cmd_demo_receiver(args: argparse.Namespace) -> int:
    import os

    from .demo.receiver import receiver_app

    secret = os.environ.get("SIDECAR_WEBHOOK_SECRET", "")
    return serve_until_stopped(
        "demo receiver", args.listen, lambda: receiver_app(secret, args.unsigned_path)
    )


def cmd_demo_traffic(args: argparse.Namespace) -> int:
    from .demo.traffic import Traffic

    async def main() -> int:
        traffic = Traffic(args.target, rps=args.rps)
        async with StopSignals() as stop:
            task = asyncio.create_task(traffic.run())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.duration)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return 0

    return run_async(main())


def cmd_events(args: argparse.Namespace) -> int:

    from redis.exceptions import RedisError

    from .reader import read_events

    # only the Redis settings matter here: no upstream is needed to read events
    settings = load_settings(
        upstream_url="http://127.0.0.1:1",  # not used: whatever the environment says
        redis_url=args.redis_url,
    )
    if not settings.redis_url:
        raise ConfigError("SIDECAR_REDIS_URL: is required to read events (or --redis-url)")
    try:
        return run_async(
            read_events(
                settings.redis_url,
                settings.redis_stream,
                count=args.count,
                follow=args.follow,
                as_json=args.json,
                out=sys.stdout,
            )
        )
    except (RedisError, OSError) as exc:  # unreachable, refused, auth, wrong type ...
        reason = " ".join(str(exc).split()) or type(exc).__name__
        print(f"latency-sidecar: cannot read events from Redis: {reason}", file=sys.stderr)
        return EXIT_CONFIG


def cmd_fleet(args: argparse.Namespace) -> int:

    from .fleet.table import show_fleet

    # only the Redis and fleet settings matter here: no upstream is needed
    settings = load_settings(
        upstream_url="http://127.0.0.1:1",  # not used: whatever the environment says
        redis_url=args.redis_url,
        fleet=args.fleet,
    )
    if not settings.fleet:
        raise ConfigError("SIDECAR_FLEET: is required to show a fleet (or --fleet NAME)")
    try:
        return run_async(show_fleet(settings, watch=args.watch))
    except OSError as exc:
        print(f"latency-sidecar: cannot read the fleet from Redis: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latency-sidecar",
        description="Latency-observing reverse proxy for an API gateway.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument("--upstream", metavar="URL", help="overrides SIDECAR_UPSTREAM_URL")
        p.add_argument("--listen", metavar="HOST:PORT", help="overrides SIDECAR_LISTEN")
        p.add_argument("--admin-listen", metavar="HOST:PORT", help="overrides SIDECAR_ADMIN_LISTEN")

    run = sub.add_parser("run", help="run the sidecar (configured by SIDECAR_* variables)")
    overrides(run)
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser(
        "demo", help="demo gateway + sidecar + traffic with a live percentile table"
    )
    demo.add_argument("--duration", type=float, help="seconds to run (default: until Ctrl-C)")
    demo.add_argument("--rps", type=float, default=40, help="demo traffic rate (default 40)")
    demo.add_argument("--refresh", type=float, default=2.0, help=argparse.SUPPRESS)
    demo.add_argument("--listen", default="127.0.0.1:8000", metavar="HOST:PORT")
    demo.add_argument("--admin-listen", default="127.0.0.1:9901", metavar="HOST:PORT")
    demo.add_argument(
        "--replicas", type=int, default=1, metavar="N",
        help="N sidecars sharing a fleet view through Redis (SIDECAR_REDIS_URL, or a "
        "redis-server from PATH); ports are then chosen freely",
    )  # fmt: skip
    demo.set_defaults(func=cmd_demo)

    gw = sub.add_parser("demo-gateway", help="run only the demo AI gateway (for compose)")
    gw.add_argument("--listen", default="0.0.0.0:8080", metavar="HOST:PORT", type=host_port)
    gw.add_argument("--seed", type=int, default=None)
    gw.add_argument(
        "--slowdowns",
        action="store_true",
        help="chat slows down x5 from 5 s to 15 s of every minute, as in `demo` (breaches to see)",
    )
    # a slower upstream for trying regression gates (analyze --compare); not for users
    gw.add_argument("--add-delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    gw.set_defaults(func=cmd_demo_gateway)

    rx = sub.add_parser(
        "demo-receiver",
        help="example webhook receiver that logs what it gets (verifies signatures when "
        "SIDECAR_WEBHOOK_SECRET is set)",
    )
    rx.add_argument("--listen", default="0.0.0.0:9000", metavar="HOST:PORT", type=host_port)
    rx.add_argument(
        "--unsigned-path",
        action="append",
        default=[],
        metavar="PATH",
        help="accept POSTs to PATH without a signature (Alertmanager does not sign); repeatable",
    )
    rx.set_defaults(func=cmd_demo_receiver)

    tr = sub.add_parser("demo-traffic", help="send demo traffic to a URL (for compose)")
    tr.add_argument("--target", required=True, metavar="URL")
    tr.add_argument("--rps", type=float, default=40)
    tr.add_argument("--duration", type=float, default=None)
    tr.set_defaults(func=cmd_demo_traffic)

    ev = sub.add_parser("events", help="read breach events back from the Redis Stream")
    ev.add_argument("--count", type=int, default=20, help="newest N events (default 20)")
    ev.add_argument("--follow", action="store_true", help="then wait for new ones")
    ev.add_argument("--json", action="store_true", help="one JSON object per line")
    ev.add_argument("--redis-url", help="overrides SIDECAR_REDIS_URL")
    ev.set_defaults(func=cmd_events)

    fl = sub.add_parser("fleet", help="the fleet's percentiles (every sidecar of SIDECAR_FLEET)")
    fl.add_argument("--watch", action="store_true", help="refresh every 2 s until Ctrl-C")
    fl.add_argument("--fleet", metavar="NAME", help="overrides SIDECAR_FLEET")
    fl.add_argument("--redis-url", metavar="URL", help="overrides SIDECAR_REDIS_URL")
    fl.set_defaults(func=cmd_fleet)

    from .analysis.command import add_parser as add_analyze

    add_analyze(sub)

    check = sub.add_parser("check-config", help="validate the environment, print settings")
    overrides(check)
    check.set_defaults(func=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, StartupError) as exc:
        for line in str(exc).splitlines():
            print(f"latency-sidecar: {line}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
