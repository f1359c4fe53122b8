"""`flead sink`: the Kafka → MongoDB sink service."""
from __future__ import annotations

import signal
import sys

from config.arguments import positive

SINK = "sink"


def register(sub) -> None:
    p = sub.add_parser("sink", help="store the stream's topics (scores, snapshots, dead letters, telemetry) in MongoDB")
    p.add_argument("action", choices=["run", "start", "stop", "rebuild-rollups", "prune"],
                   help="run: in the foreground; start/stop: as a background process that `flead down` stops too; "
                        "rebuild-rollups: recompute every roll-up from predictions and device_data (with the sink "
                        "stopped; the sink repairs roll-ups after a crash by itself); prune: delete what is past "
                        "its retention horizon now (the sink does it every retention.prune_interval_s)")
    p.add_argument("--until-idle", type=positive(), default=None, metavar="S",
                   help="run: stop after S seconds without messages (default: run until Ctrl-C)")
    p.set_defaults(func=cmd_sink)


def sink_service(cfg):
    """The sink as a background service of the state directory (supervised: restarted if it dies)."""
    from services.service import Service

    return Service(cfg.state_dir, SINK, [sys.executable, "-m", "orchestration.cli", "sink", "run"], env=cfg.to_env())


def cmd_sink(args, cfg) -> int:
    if args.action == "start":
        print(sink_service(cfg).start())
        return 0
    if args.action == "stop":
        print("sink stopped" if sink_service(cfg).stop() else "sink was not running")
        return 0
    if args.action in ("rebuild-rollups", "prune"):
        from storage.mongo import StorageError, Store

        if args.action == "rebuild-rollups" and sink_service(cfg).pid:
            print("flead sink rebuild-rollups: the sink is running; stop it first (`flead sink stop`)", file=sys.stderr)
            return 2
        try:
            with Store(cfg) as store:
                if args.action == "prune":
                    deleted = store.prune()
                    print("pruned: " + (", ".join(f"{k} {n}" for k, n in deleted.items() if n) or "nothing"))
                else:
                    read, written = store.rebuild_rollups()
                    print(f"roll-ups rebuilt: {read:,} scored readings and their telemetry in {written:,} documents")
        except StorageError as exc:
            print(f"flead sink {args.action}: {exc}", file=sys.stderr)
            return 1
        return 0
    from storage.sink import MongoSink

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    sink = MongoSink(cfg)
    stats = sink.run(until_idle_s=args.until_idle, should_stop=lambda: bool(stopping),
                     progress=lambda line: print(line, flush=True))
    print(sink.describe(), flush=True)
    return 0 if not stats.get("kafka_errors") else 1
