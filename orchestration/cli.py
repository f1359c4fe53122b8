"""`flead`: the command line of FLEAD.

Each command lives in its own module, which exposes ``register(subparsers)``: it adds its parser and sets
``func(args, cfg) -> int``. Modules import heavy libraries (pyflink, pyspark) inside ``func`` only, so
``flead --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from config import ConfigError, load_config
from services import supervisor
from services.processes import PRIVATE_UMASK, ServiceError
from services.service import SERVICE_VARIABLE
from storage.errors import StorageError
from telemetry.readers import ReaderError

# Modules that register commands, in the order `flead --help` lists them.
COMMAND_MODULES = [
    "orchestration.stack_cli",      # up, down, status, doctor
    "telemetry.cli",                # produce, consume
    "storage.cli",                  # sink
    "orchestration.evaluate_cli",   # evaluate
    "flink_jobs.cli",               # stream
    "spark_jobs.cli",               # aggregate, evaluate-models, api
    "monitoring.cli",               # router, health
    "visualization.cli",            # superset
    "orchestration.demo",           # demo
    "orchestration.report",         # report
]

# `down` stops the supervisor; `up` starts it itself. (Nor does a service's own process, e.g. `flead sink run`
# started by `flead sink start`, marked by SERVICE_VARIABLE: it may be exiting because `flead down` stops it.)
COMMANDS_WITHOUT_SUPERVISOR = {"down", "up"}
DEBUG_VARIABLE = "FLEAD_DEBUG"  # set: errors of input files and servers show their traceback


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flead", description="Real-time, federated anomaly detection on device telemetry.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that part is not installed in this checkout
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        cfg = load_config()
    except ConfigError as exc:
        print(f"flead: configuration error: {exc}", file=sys.stderr)
        return 2
    saved_umask = os.umask(PRIVATE_UMASK)  # what flead writes (state dir, logs, databases, credentials) is private
    try:
        return int(args.func(args, cfg) or 0)
    except KeyboardInterrupt:
        print("flead: interrupted", file=sys.stderr)
        return 130
    except (ReaderError, OSError, StorageError, ServiceError, ConfigError) as exc:  # a file not read, a server
        # not reached, a setting only a command checks
        if os.environ.get(DEBUG_VARIABLE):
            raise
        print(f"flead {args.command}: {exc} ({DEBUG_VARIABLE}=1 shows where)", file=sys.stderr)
        return 2
    finally:
        os.umask(saved_umask)  # `main` also runs inside other programs (tests)
        if args.command not in COMMANDS_WITHOUT_SUPERVISOR and SERVICE_VARIABLE not in os.environ:
            supervisor.ensure_running(cfg)  # back if it died: services that died since are restarted


if __name__ == "__main__":
    sys.exit(main())
