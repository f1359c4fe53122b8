"""A local Spark standalone cluster (one master, one worker) from the pip-installed pyspark distribution.

    flead spark-cluster start    # master spark://127.0.0.1:<aggregation.spark_master_port>
    flead spark-cluster stop     # `flead down` stops it too

Both daemons run ``$SPARK_HOME/bin/spark-class`` (``$SPARK_HOME`` = the pyspark package directory) as processes
``spark-master`` and ``spark-worker`` of the state directory, bound to 127.0.0.1; logs in ``<state_dir>/logs/``,
the worker's application files in ``<state_dir>/spark-worker/``.
"""
from __future__ import annotations

import importlib.util
import json
import urllib.request
from pathlib import Path
from typing import Callable

from config import PROJECT_ROOT, Config
from services import processes
from services.service import Service, stop_by_name
from spark_jobs.session import worker_environment

MASTER = "spark-master"
WORKER = "spark-worker"
HOST = "127.0.0.1"
START_TIMEOUT_S = 90.0
DAEMON_MEMORY = "256m"  # heap of the master and worker JVMs (the executor gets the worker's --memory)
WORKER_MEMORY = "1g"


def spark_home() -> Path:
    """The pip-installed Spark distribution: the pyspark package directory (found without importing it)."""
    spec = importlib.util.find_spec("pyspark")
    if spec is None or spec.origin is None:
        raise processes.ServiceError("pyspark is not installed in this Python environment")
    return Path(spec.origin).parent


def master_url(cfg: Config) -> str:
    return f"spark://{HOST}:{cfg.aggregation.spark_master_port}"


def master_webui_url(cfg: Config) -> str:
    return f"http://{HOST}:{cfg.aggregation.spark_master_webui_port}"


def master_state(cfg: Config) -> dict | None:
    """The master web UI's JSON (``aliveworkers``, ``activeapps``, ``completedapps``, ...), or None if unreachable."""
    try:
        with urllib.request.urlopen(f"{master_webui_url(cfg)}/json/", timeout=2.0) as response:
            return json.load(response)
    except (OSError, ValueError):
        return None


def _alive_workers(cfg: Config) -> int:
    return (master_state(cfg) or {}).get("aliveworkers", 0)


def start(cfg: Config, say: Callable[[str], None] = print) -> None:
    """Start the master, then one worker (1 core, 1 GB); returns once the worker has registered."""
    if processes.running_pid(cfg.state_dir, MASTER) and processes.running_pid(cfg.state_dir, WORKER):
        say(f"Spark cluster already running at {master_url(cfg)}")
        return
    stop(cfg, say=lambda line: None)  # a half-started cluster from before
    for key in ("spark_master_port", "spark_master_webui_port", "spark_worker_webui_port"):
        processes.ensure_port_free(HOST, cfg.aggregation[key], f"FLEAD_AGGREGATION_{key.upper()}")
    spark_class = str(spark_home() / "bin" / "spark-class")
    env = {**cfg.to_env(), **worker_environment(), "SPARK_HOME": str(spark_home()), "SPARK_LOCAL_IP": HOST,
           "SPARK_DAEMON_MEMORY": DAEMON_MEMORY}
    work_dir = processes.private_dir(cfg.state_dir / WORKER)
    try:
        Service(cfg.state_dir, MASTER, [
            spark_class, "org.apache.spark.deploy.master.Master", "--host", HOST,
            "--port", str(cfg.aggregation.spark_master_port),
            "--webui-port", str(cfg.aggregation.spark_master_webui_port)], env=env, cwd=PROJECT_ROOT,
            ready=lambda: processes.port_open(HOST, cfg.aggregation.spark_master_port), ready_what="master port open",
            ready_timeout=START_TIMEOUT_S).start()
        Service(cfg.state_dir, WORKER, [
            spark_class, "org.apache.spark.deploy.worker.Worker", master_url(cfg), "--host", HOST,
            "--cores", "1", "--memory", WORKER_MEMORY, "--work-dir", str(work_dir),
            "--webui-port", str(cfg.aggregation.spark_worker_webui_port)], env=env, cwd=PROJECT_ROOT,
            ready=lambda: _alive_workers(cfg) >= 1, ready_what="worker registered with the master",
            ready_timeout=START_TIMEOUT_S).start()
    except processes.ServiceError:
        stop(cfg, say=lambda line: None)
        raise
    say(f"Spark cluster started: master {master_url(cfg)}, web UI {master_webui_url(cfg)}, "
        f"logs {processes.log_path(cfg.state_dir, MASTER).parent}")


def stop(cfg: Config, say: Callable[[str], None] = print) -> list[str]:
    """Stop the worker (and its executors), then the master; returns the names of those that were running."""
    stopped = [name for name in (WORKER, MASTER) if stop_by_name(cfg.state_dir, name)]
    say(f"stopped {', '.join(stopped)}" if stopped else "Spark cluster was not running")
    return stopped
