"""`flead stream {start,stop,status,cluster-start,cluster-stop}`: the PyFlink stream job and a local cluster."""
from __future__ import annotations

import os
import subprocess
import sys

from config import PROJECT_ROOT

PROCESS = "stream"  # name under which orchestration.processes knows the job (so `flead down` stops it)
JOB = PROJECT_ROOT / "flink_jobs" / "anomaly_job.py"


def register(sub) -> None:
    p = sub.add_parser("stream", help="the PyFlink stream job: score telemetry, snapshot models, adopt global models")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = actions.add_parser("start", help="run the job in the background (local MiniCluster)")
    a.add_argument("--bounded", action="store_true",
                   help="read the telemetry topic to its current end in the foreground, then stop")
    a.add_argument("--from-savepoint", metavar="PATH|latest",
                   help="restore from a savepoint or retained checkpoint ('latest': the newest retained checkpoint)")
    a.set_defaults(func=cmd_start)
    actions.add_parser("stop", help="stop the background job").set_defaults(func=cmd_stop)
    actions.add_parser("status", help="is the background job running").set_defaults(func=cmd_status)
    actions.add_parser("cluster-start", help="start a local standalone Flink cluster (stream.rest_port)").set_defaults(
        func=cmd_cluster, cluster_action="start")
    actions.add_parser("cluster-stop", help="stop the local standalone Flink cluster").set_defaults(
        func=cmd_cluster, cluster_action="stop")


def cmd_start(args, cfg) -> int:
    from orchestration import processes

    cmd = [sys.executable, str(JOB)]
    if args.from_savepoint:
        cmd += ["--from-savepoint", args.from_savepoint]
    if args.bounded:
        return subprocess.run([*cmd, "--bounded"], env={**os.environ, **cfg.to_env()}).returncode
    pid = processes.running_pid(cfg.state_dir, PROCESS)
    if pid is not None:
        print(f"stream job already running (pid {pid})")
        return 0
    pid = processes.start(cfg.state_dir, PROCESS, cmd, env=cfg.to_env(), cwd=PROJECT_ROOT)
    print(f"stream job started (pid {pid}); log: {processes.log_path(cfg.state_dir, PROCESS)}")
    return 0


def cmd_stop(args, cfg) -> int:
    from orchestration import processes

    print("stream job stopped" if processes.stop(cfg.state_dir, PROCESS) else "stream job was not running")
    return 0


def cmd_status(args, cfg) -> int:
    from orchestration import processes

    pid = processes.running_pid(cfg.state_dir, PROCESS)
    print(f"stream job running (pid {pid})" if pid else "stream job not running")
    return 0 if pid else 1


def cmd_cluster(args, cfg) -> int:
    from flink_jobs import cluster
    from orchestration.processes import StackError

    try:
        getattr(cluster, args.cluster_action)(cfg)
    except StackError as exc:
        print(f"flead stream: {exc}", file=sys.stderr)
        return 1
    return 0
