"""`flead router run|start|stop|retry-dead` (incidents to Alertmanager and webhooks) and `flead health`."""
from __future__ import annotations

import json
import signal
import sys

from config.arguments import positive

ROUTER = "router"


def register(sub) -> None:
    p = sub.add_parser(ROUTER, help="deliver incidents to Alertmanager and webhooks (router.* settings)",
                       description="Consume the incidents topic and deliver each opened and resolved incident to "
                                   "router.alertmanager_urls and router.webhook_urls, with retries; delivery state "
                                   "is kept in MongoDB (docs/monitoring.md).")
    p.add_argument("action", choices=["run", "start", "stop", "retry-dead"],
                   help="run: in the foreground; start/stop: as a background process that `flead down` stops too; "
                        "retry-dead: make failed (dead) deliveries pending again, e.g. after fixing a receiver")
    p.add_argument("--until-idle", type=positive(), default=None, metavar="S",
                   help="run: stop after S seconds with nothing to do and nothing pending")
    p.set_defaults(func=cmd_router)
    p = sub.add_parser("health", help="is each service up and keeping pace (exit 0 healthy, 1 not)",
                       description="Servers answer, processes flead started run, consumer groups are at most "
                                   "health.max_lag_messages behind. The API serves the same at /healthz.")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_health)


def router_service(cfg):
    """The incident router as a supervised background service of the state directory."""
    from services.service import Service

    return Service(cfg.state_dir, ROUTER, [sys.executable, "-m", "orchestration.cli", ROUTER, "run"], env=cfg.to_env())


def cmd_router(args, cfg) -> int:
    if args.action == "start":
        print(router_service(cfg).start())
        return 0
    if args.action == "stop":
        print("router stopped" if router_service(cfg).stop() else "router was not running")
        return 0
    if args.action == "retry-dead":
        from monitoring.router import retry_dead

        print(f"{retry_dead(cfg)} dead deliveries are pending again")
        return 0
    from monitoring.router import IncidentRouter

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    router = IncidentRouter(cfg)
    print(f"router: {len(router.receivers)} receiver(s): "
          + (", ".join(f"{r.kind} {r.url}" for r in router.receivers) or "none"), flush=True)
    router.run(should_stop=lambda: bool(stopping), until_idle_s=args.until_idle,
               progress=lambda line: print(line, flush=True))
    print(router.describe(), flush=True)
    return 0


def cmd_health(args, cfg) -> int:
    from monitoring.health import check_health, format_report

    report = check_health(cfg)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["ok"] else 1
