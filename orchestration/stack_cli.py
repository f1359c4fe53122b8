"""`flead up`, `flead down`, `flead status`: the embedded local stack."""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("up", help="start the embedded Kafka broker and MongoDB server, create topics and collections")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("down", help="stop every process flead started (jobs, Superset, servers)")
    p.set_defaults(func=cmd_down)
    p = sub.add_parser("status", help="show what runs and whether the servers answer")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)


def cmd_up(args, cfg) -> int:
    from orchestration import stack
    from orchestration.processes import StackError
    from storage.mongo import StorageError

    try:
        stack.up(cfg)
    except (StackError, StorageError) as exc:
        print(f"flead up: {exc}")
        return 1
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
            print(f"{name:<12} {state:<8} pid={info['pid'] or '-':<8} {health} {info.get('address', '')}")
    servers_ok = report["kafka"]["healthy"] and report["mongo"]["healthy"]
    return 0 if servers_ok else 1
