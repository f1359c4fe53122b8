"""`flead superset {start,stop,status,import}`: the dashboards server."""
from __future__ import annotations

import argparse
import functools
import json
import sys

from visualization import superset_server
from visualization.superset_server import SupersetError


def _reporting_errors(handler):
    """Print a SupersetError as one line and exit 1, instead of a traceback."""
    @functools.wraps(handler)
    def run(args: argparse.Namespace, cfg) -> int:
        try:
            return handler(args, cfg)
        except SupersetError as exc:
            print(f"flead superset: {exc}", file=sys.stderr)
            return 1
    return run


@_reporting_errors
def _start(args: argparse.Namespace, cfg) -> int:
    url = superset_server.start(cfg, import_dashboards=not args.no_import)
    login = superset_server.credentials(cfg)
    print(f"Superset at {url} (user {login['username']}, password in "
          f"{superset_server.superset_dir(cfg) / 'credentials'})")
    return 0


@_reporting_errors
def _stop(args: argparse.Namespace, cfg) -> int:
    print("Superset stopped" if superset_server.stop(cfg) else "Superset was not running")
    return 0


@_reporting_errors
def _status(args: argparse.Namespace, cfg) -> int:
    state = superset_server.status(cfg)
    print(json.dumps(state, indent=2))
    return 0 if state["healthy"] else 1


@_reporting_errors
def _import(args: argparse.Namespace, cfg) -> int:
    superset_server.import_bundle(cfg)
    print(f"dashboards imported into {superset_server.base_url(cfg)}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("superset", help="Superset dashboards: start, stop, status, import")
    actions = parser.add_subparsers(dest="superset_command", metavar="ACTION", required=True)
    start = actions.add_parser("start", help="set up (once), serve on superset.host:port and import the dashboards")
    start.add_argument("--no-import", action="store_true", help="serve without (re)importing the dashboards")
    start.set_defaults(func=_start)
    actions.add_parser("stop", help="stop the server").set_defaults(func=_stop)
    actions.add_parser("status", help="whether the server runs and answers (exit 1 if not)").set_defaults(func=_status)
    actions.add_parser("import", help="(re)import the dashboard bundle into the running server").set_defaults(
        func=_import)
