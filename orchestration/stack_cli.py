"""`flead up`, `flead down`, `flead status`, `flead doctor`: the embedded local stack and its services."""
from __future__ import annotations

import json
import time


def register(sub) -> None:
    p = sub.add_parser("up", help="start the embedded Kafka broker and MongoDB server, create topics and collections, "
                                  "restart services that died, start the supervisor")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("down", help="stop every process flead started (supervisor, jobs, Superset, servers)")
    p.set_defaults(func=cmd_down)
    p = sub.add_parser("status", help="show what runs, how often the supervisor restarted it, whether servers answer")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("doctor", help="check and repair: restart services that died, make the state directory "
                                      "private, report anything listening outside 127.0.0.1")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_doctor)


def cmd_up(args, cfg) -> int:
    from orchestration import stack
    from services.processes import ServiceError
    from storage.mongo import StorageError

    try:
        report = stack.up(cfg)
    except (ServiceError, StorageError) as exc:
        print(f"flead up: {exc}")
        return 1
    print(f"supervisor {report['supervisor']}: restarts services that die (`flead status` counts the restarts)")
    print(f"state dir: {cfg.state_dir} (logs in {cfg.state_dir / 'logs'})")
    return 0


def cmd_down(args, cfg) -> int:
    from orchestration import stack

    if not stack.down(cfg):
        print("nothing of flead's was running")
    return 0


def cmd_status(args, cfg) -> int:
    from orchestration import stack

    report = stack.status(cfg)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, info in report.items():
            state = "running" if info["running"] else "stopped"
            health = {True: "healthy", False: "not answering"}.get(info.get("healthy"), "")
            restarts = f"restarts={info.get('restarts', 0)}" if info.get("supervised") else ""
            print(f"{name:<13} {state:<8} pid={info['pid'] or '-':<8} {restarts:<11} {health} "
                  f"{info.get('address', '')}".rstrip())
    servers_ok = report["kafka"]["healthy"] and report["mongo"]["healthy"]
    return 0 if servers_ok else 1


def cmd_doctor(args, cfg) -> int:
    from orchestration import doctor

    findings = doctor.examine(cfg)
    if args.json:
        print(json.dumps([f.__dict__ for f in findings], indent=2))
    else:
        for finding in findings:
            print(f"{finding.outcome:<6} {finding.check:<11} {finding.detail}")
    failed = [f for f in findings if f.outcome == doctor.FAIL]
    if not args.json:
        print(f"{len(failed)} problem(s) left at {time.strftime('%H:%M:%S')}" if failed else "all good")
    return 1 if failed else 0
