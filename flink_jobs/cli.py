"""`flead stream {start,stop,status,cluster-start,cluster-stop}`: the PyFlink stream job and a local cluster."""
from __future__ import annotations

import os
import subprocess
import sys

from config import PROJECT_ROOT

PROCESS = "stream"  # the job's service name (pid file, log, registration): `flead down` stops it too
JOB = PROJECT_ROOT / "flink_jobs" / "anomaly_job.py"
RESUME = "auto"  # the job's --from-savepoint value for "the newest retained checkpoint or savepoint, if any"
EXIT_MARGIN_S = 15  # after its savepoint (stream.stop_savepoint_timeout_s), the time the job's process has to end


def register(sub) -> None:
    p = sub.add_parser("stream", help="the PyFlink stream job: score telemetry, snapshot models, adopt global models")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = actions.add_parser("start", help="run the job in the background (local MiniCluster), supervised; it resumes "
                                         "from its newest checkpoint or savepoint, so models continue after a stop "
                                         "or a crash")
    a.add_argument("--bounded", action="store_true",
                   help="read the telemetry topic to its current end in the foreground, then stop")
    start_from = a.add_mutually_exclusive_group()
    start_from.add_argument("--from-savepoint", metavar="PATH|latest",
                            help="restore from this savepoint or retained checkpoint ('latest': the newest "
                                 "checkpoint or savepoint, an error if there is none; default: the newest one if "
                                 "any)")
    start_from.add_argument("--fresh", action="store_true",
                            help="start without restoring state: every device's model starts anew (restarts after a "
                                 "crash still resume from the checkpoints this run makes)")
    a.set_defaults(func=cmd_start)
    actions.add_parser("stop", help="stop the background job with a savepoint; the next start resumes from it "
                                    "(on either state backend)").set_defaults(func=cmd_stop)
    actions.add_parser("status", help="is the background job running, and what a start resumes from").set_defaults(
        func=cmd_status)
    actions.add_parser("cluster-start", help="start a local standalone Flink cluster (stream.rest_port)").set_defaults(
        func=cmd_cluster, cluster_action="start")
    actions.add_parser("cluster-stop", help="stop the local standalone Flink cluster").set_defaults(
        func=cmd_cluster, cluster_action="stop")


def stream_service(cfg, start_from: str | None = RESUME):
    """The job as a supervised service; it first starts from `start_from` (None: fresh), and a restart after a
    crash always resumes from the newest retained checkpoint or savepoint. Stopping it gives the job's process
    alone SIGTERM first and time to stop the job with a savepoint (`anomaly_job.run_until_stopped`)."""
    from services.service import Service

    job = [sys.executable, str(JOB)]
    return Service(cfg.state_dir, PROCESS, job + (["--from-savepoint", start_from] if start_from else []),
                   env=cfg.to_env(), cwd=PROJECT_ROOT, restart_argv=job + ["--from-savepoint", RESUME],
                   leader_grace=cfg.stream.stop_savepoint_timeout_s + EXIT_MARGIN_S)


def cmd_start(args, cfg) -> int:
    if args.bounded:
        cmd = [sys.executable, str(JOB), "--bounded"] + (["--from-savepoint", args.from_savepoint]
                                                         if args.from_savepoint else [])
        return subprocess.run(cmd, env={**os.environ, **cfg.to_env()}).returncode
    start_from = None if args.fresh else args.from_savepoint or RESUME
    print(stream_service(cfg, start_from).start())
    return 0


def resumes(cfg) -> str:
    """What a start does with the models: "resumes from <newest checkpoint or savepoint>", or starts them anew."""
    from flink_jobs.checkpoints import latest_restore_point

    point = latest_restore_point(cfg)
    return f"resumes from {point}" if point else "starts every model anew (no checkpoint or savepoint yet)"


def cmd_stop(args, cfg) -> int:
    stopped = stream_service(cfg).stop()
    print(f"stream job {'stopped' if stopped else 'was not running'}; `flead stream start` {resumes(cfg)}")
    return 0


def cmd_status(args, cfg) -> int:
    status = stream_service(cfg).status()
    print(f"stream job running (pid {status['pid']}, {status['restarts']} restart(s) by the supervisor); a restart "
          f"{resumes(cfg)}" if status["running"] else f"stream job not running; `flead stream start` {resumes(cfg)}")
    return 0 if status["running"] else 1


def cmd_cluster(args, cfg) -> int:
    from flink_jobs import cluster
    from services.processes import ServiceError

    try:
        getattr(cluster, args.cluster_action)(cfg)
    except ServiceError as exc:
        print(f"flead stream: {exc}", file=sys.stderr)
        return 1
    return 0
