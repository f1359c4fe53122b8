"""A local standalone Flink cluster from the pip-installed distribution (`site-packages/pyflink/bin`).

    .venv/bin/python -m flink_jobs.cluster {start,stop,submit}

The cluster's configuration is generated into ``<state_dir>/flink/conf`` (every server on 127.0.0.1, see
`flink_jobs.binding`; REST on ``stream.rest_port``, ``stream.task_slots`` slots, the workers on this virtualenv's
Python), its lib folder into ``<state_dir>/flink/lib``; its logs go to ``<state_dir>/logs/flink-cluster``. `submit` runs the stream job on it with `flink run -d`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from config import PROJECT_ROOT, load_config
from flink_jobs import WORKER_PACKAGES, java_options, worker_blas_env
from flink_jobs.binding import LOOPBACK, LOOPBACK_SETTINGS, flink_home, lib_dir
from services import processes
from services.processes import ServiceError, port_open

FLINK_HOME = flink_home()
START_TIMEOUT_S = 60
JOB = PROJECT_ROOT / "flink_jobs" / "anomaly_job.py"


def conf_dir(cfg) -> Path:
    return cfg.state_dir / "flink" / "conf"


def distribution_java_opts() -> str:
    """`env.java.opts.all` of the pip distribution's own conf/config.yaml (the JVM module flags Flink needs)."""
    import yaml

    shipped = yaml.safe_load((FLINK_HOME / "conf" / "config.yaml").read_text()) or {}
    return str(((shipped.get("env") or {}).get("java") or {}).get("opts", {}).get("all", ""))


def write_conf(cfg) -> Path:
    """The cluster's config.yaml (plus the distribution's log4j files) in the state directory."""
    target = conf_dir(cfg)
    target.mkdir(parents=True, exist_ok=True)
    for log_conf in (FLINK_HOME / "conf").glob("log4j*.properties"):
        shutil.copy(log_conf, target / log_conf.name)
    python = cfg.stream.python_executable or sys.executable
    settings = {
        **LOOPBACK_SETTINGS, "rest.port": cfg.stream.rest_port,
        "jobmanager.memory.process.size": "1024m", "taskmanager.memory.process.size": "1728m",
        "taskmanager.numberOfTaskSlots": cfg.stream.task_slots, "parallelism.default": cfg.stream.parallelism,
        "python.executable": python, "python.client.executable": python,
        "env.log.dir": str(cfg.state_dir / "logs" / "flink-cluster"),
        "env.pid.dir": str(processes.private_dir(cfg.state_dir / "flink" / "run")),  # not /tmp: ours only
        # the distribution's --add-opens/--add-exports for Java 17 (without them `flink run` fails with
        # "Can not register process function transformation translator")
        "env.java.opts.all": f"{distribution_java_opts()} {java_options(cfg)}".strip(),
    }
    (target / "config.yaml").write_text("".join(f"{key}: {value}\n" for key, value in settings.items()))
    # start-cluster.sh reads the hosts from these (the distribution ships none); 127.0.0.1 is started without ssh
    (target / "masters").write_text(f"{LOOPBACK}:{cfg.stream.rest_port}\n")
    (target / "workers").write_text(f"{LOOPBACK}\n")
    (cfg.state_dir / "logs" / "flink-cluster").mkdir(parents=True, exist_ok=True)  # the daemons do not create it
    return target


def flink_env(cfg) -> dict[str, str]:
    """Environment for the distribution's scripts: our conf dir, the venv first on PATH, FLEAD_* settings."""
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, **worker_blas_env(cfg), **cfg.to_env(), "FLINK_CONF_DIR": str(conf_dir(cfg)), "FLINK_HOME": str(FLINK_HOME),
            "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}"}


def start(cfg) -> None:
    """Start the job manager and one task manager; returns when the REST port answers."""
    if port_open(LOOPBACK, cfg.stream.rest_port):
        raise ServiceError(f"{LOOPBACK}:{cfg.stream.rest_port} is taken (a cluster already running?); "
                         "choose another with FLEAD_STREAM_REST_PORT")
    write_conf(cfg)
    subprocess.run([str(FLINK_HOME / "bin" / "start-cluster.sh")],
                   env={**flink_env(cfg), "FLINK_LIB_DIR": str(lib_dir(cfg, "lib", with_flink_python=True))},
                   check=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not port_open(LOOPBACK, cfg.stream.rest_port):
        if time.monotonic() > deadline:
            raise ServiceError(f"Flink REST port {cfg.stream.rest_port} not answering after {START_TIMEOUT_S} s; "
                             f"see {cfg.state_dir / 'logs' / 'flink-cluster'}")
        time.sleep(0.5)


def stop(cfg) -> None:
    subprocess.run([str(FLINK_HOME / "bin" / "stop-cluster.sh")], env=flink_env(cfg), check=True)


def submit(cfg, *job_args: str) -> None:
    """`flink run -d` the stream job on the local cluster (project packages shipped with -pyfs)."""
    packages = ",".join(str(PROJECT_ROOT / p) for p in WORKER_PACKAGES)
    subprocess.run([str(FLINK_HOME / "bin" / "flink"), "run", "-d", "-py", str(JOB), "-pyfs", packages,
                    *job_args], env=flink_env(cfg), check=True, cwd=PROJECT_ROOT)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    actions = {"start": start, "stop": stop, "submit": submit}
    if not argv or argv[0] not in actions:
        print(__doc__)
        return 2
    actions[argv[0]](load_config(), *argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
