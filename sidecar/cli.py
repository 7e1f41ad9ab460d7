"""The `latency-sidecar` command: run, demo, check-config, events."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from . import __version__
from .config import ConfigError, Settings, load_settings
from .logs import flush_logging, setup_logging

EXIT_CONFIG = 2


def run_async(main: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when it is installed, else on asyncio's default loop."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


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
    try:
        return run_async(serve(settings))
    finally:
        flush_logging()


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    width = max(len(k) for k in settings.masked())
    print("configuration OK; effective settings:")
    for key, value in settings.masked().items():
        print(f"  {key:<{width}} = {value}")
    return 0


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

    check = sub.add_parser("check-config", help="validate the environment, print settings")
    overrides(check)
    check.set_defaults(func=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"latency-sidecar: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
