"""`flead aggregate`, `flead evaluate-models`, `flead scheduler {start,stop}`, `flead api {start,stop}`,
`flead spark-cluster {start,stop}`."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SCHEDULER = "scheduler"
API = "api"
SPARK_CLUSTER = "spark-cluster"
API_START_TIMEOUT_S = 60.0


def register(sub) -> None:
    for name, job, help_text in (
            ("aggregate", "aggregate_job", "run one federated aggregation round now (Spark)"),
            ("evaluate-models", "evaluate_job", "score stored telemetry with the newest global and local models "
                                                "(at most aggregation.evaluation_devices devices, drawn at random, "
                                                "each on its newest aggregation.evaluation_readings readings)")):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--spark-submit", action="store_true",
                       help="run through spark-submit (a fresh Spark application) instead of in this process")
        p.add_argument("--master", help="Spark master, e.g. local[2] or spark://host:7077 "
                                        "(default: aggregation.spark_master)")
        p.set_defaults(func=cmd_job, job=job)
    p = sub.add_parser(SCHEDULER, help="background scheduler: aggregation then evaluation every "
                                       "aggregation.schedule_minutes")
    p.add_argument("action", choices=["start", "stop"])
    p.set_defaults(func=cmd_scheduler)
    p = sub.add_parser(API, help="the global model REST server (api.host:api.port, OpenAPI at /docs)")
    p.add_argument("action", choices=["start", "stop"])
    p.set_defaults(func=cmd_api)
    p = sub.add_parser(SPARK_CLUSTER, help="a local Spark standalone master and worker "
                                           "(spark://127.0.0.1:aggregation.spark_master_port) for --master")
    p.add_argument("action", choices=["start", "stop"])
    p.set_defaults(func=cmd_spark_cluster)


def spark_submit_path() -> str:
    """The venv's spark-submit (next to this interpreter), else the one on PATH."""
    beside = Path(sys.executable).parent / "spark-submit"
    found = str(beside) if beside.exists() else shutil.which("spark-submit")
    if not found:
        raise SystemExit("flead: spark-submit not found next to this python or on PATH; install pyspark")
    return found


def cmd_job(args, cfg) -> int:
    from config import PROJECT_ROOT
    from spark_jobs.session import submit_options, worker_environment

    if args.spark_submit:
        cmd = [spark_submit_path(), "--master", args.master or cfg.aggregation.spark_master,
               *submit_options(cfg), str(PROJECT_ROOT / "spark_jobs" / f"{args.job}.py")]
        env = {**os.environ, **cfg.to_env(), **worker_environment()}
        return subprocess.run(cmd, env=env, cwd=PROJECT_ROOT).returncode
    from spark_jobs.session import spark_session

    spark = spark_session(cfg, f"flead-{args.job}", args.master)
    try:
        if args.job == "aggregate_job":
            from spark_jobs.aggregate_job import run_round
            outcome = run_round(spark, cfg)
        else:
            from spark_jobs.evaluate_job import run_evaluation
            outcome = run_evaluation(spark, cfg)
    finally:
        spark.stop()
    print(outcome.message)
    for problem in getattr(outcome, "problems", []):
        print(f"  {problem['device_id']}: {problem['problem']}")
    return 0


def background_service(cfg, name: str, module: str = "", ready=None, ready_what: str = "ready"):
    """A supervised background service running ``python -m module`` with Spark's worker environment."""
    from config import PROJECT_ROOT
    from services.service import Service
    from spark_jobs.session import worker_environment

    return Service(cfg.state_dir, name, [sys.executable, "-m", module], env={**cfg.to_env(), **worker_environment()},
                   cwd=PROJECT_ROOT, ready=ready, ready_what=ready_what, ready_timeout=API_START_TIMEOUT_S)


def _stop_background(cfg, name: str) -> int:
    print(f"{name} stopped" if background_service(cfg, name).stop() else f"{name} was not running")
    return 0


def cmd_scheduler(args, cfg) -> int:
    if args.action == "stop":
        return _stop_background(cfg, SCHEDULER)
    print(background_service(cfg, SCHEDULER, "spark_jobs.scheduler").start())
    return 0


def cmd_api(args, cfg) -> int:
    from services import processes

    if args.action == "stop":
        return _stop_background(cfg, API)
    service = background_service(cfg, API, "spark_jobs.api", ready=lambda: processes.port_open(cfg.api.host,
                                                                                              cfg.api.port),
                                 ready_what="HTTP port open")
    try:
        if service.pid is None:
            processes.ensure_port_free(cfg.api.host, cfg.api.port, "FLEAD_API_PORT")
        from spark_jobs.api import api_token

        api_token(cfg)  # created here, so it exists before the first request
        print(service.start())
    except processes.ServiceError as exc:
        print(f"flead api: {exc}")
        return 1
    where = "api.token" if cfg.api.token else str(cfg.state_dir / "api_token")
    url = f"http://{cfg.api.host}:{cfg.api.port}"
    print(f"api     {url} (OpenAPI docs: {url}/docs; bearer token in {where})")
    return 0


def cmd_spark_cluster(args, cfg) -> int:
    from services.processes import ServiceError
    from spark_jobs import standalone

    if args.action == "stop":
        standalone.stop(cfg)
        return 0
    try:
        standalone.start(cfg)
    except ServiceError as exc:
        print(f"flead spark-cluster: {exc}")
        return 1
    return 0
