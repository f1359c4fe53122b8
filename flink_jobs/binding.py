"""Keep every server of the stream job on 127.0.0.1: Flink's own, and the gRPC servers of its Python workers.

Flink listens on all interfaces unless told otherwise, and its REST API takes job cancellations and jar uploads
without authentication. `LOOPBACK_SETTINGS` are the Flink 2.2 options that bind its servers (REST endpoint,
BLOB server and RPC of the job and task managers, which the MiniCluster of a local run shares) to the loopback
address; the MiniCluster's task managers exchange data in memory (no data port).

The Python workers' gRPC servers (control, data, state, logging, artifacts, provisioning: six per Python
operator) have no option: flink-python builds them with ``NettyServerBuilder.forPort``, i.e. on every interface.
`orchestration/setup.sh` compiles ``flink_jobs/beam-patches/ServerFactory.java`` into `PATCH_JAR`, a
replacement of that one class which binds the loopback address (the jar also carries Beam's outbound data buffer
with a time-based flush, `flink_jobs.java_options`); `lib_dir` makes a Flink lib folder that puts it in
front of flink-python on the classpath (a local run sets ``FLINK_LIB_DIR`` to it, a standalone cluster starts from
it). Without the jar (set-up not run) the job still runs, with those ports open: `flead doctor` reports them.
"""
from __future__ import annotations

import os
from pathlib import Path

LOOPBACK = "127.0.0.1"
LOOPBACK_SETTINGS = {
    "rest.bind-address": LOOPBACK,        # the REST endpoint and web UI
    "rest.address": LOOPBACK,             # ... and the address clients are told
    "jobmanager.bind-host": LOOPBACK,     # job manager RPC and the BLOB server
    "jobmanager.rpc.address": LOOPBACK,
    "taskmanager.bind-host": LOOPBACK,    # task manager RPC and data port (standalone cluster)
    "taskmanager.host": LOOPBACK,
}
PATCH_JAR_NAME = "flead-beam-patches.jar"  # sorts before flink-python*.jar, as the cluster scripts sort lib/


def patch_jar(build_dir: Path) -> Path:
    """Where set-up puts the patched classes of flink-python's Beam (`flink_jobs/beam-patches`)."""
    return Path(build_dir) / "flink-patches" / PATCH_JAR_NAME


def flink_home() -> Path:
    """The Flink distribution inside the pyflink package (found without importing pyflink)."""
    import importlib.util

    spec = importlib.util.find_spec("pyflink")
    if spec is None or spec.origin is None:
        raise RuntimeError("pyflink is not installed in this Python environment")
    return Path(spec.origin).parent


def lib_dir(cfg, name: str, with_flink_python: bool) -> Path:
    """``<state_dir>/flink/<name>``: symlinks to the distribution's lib/ jars and the loopback patch (if built),
    plus opt/flink-python when `with_flink_python` (a standalone cluster needs it in lib/; a local run's launcher
    appends it after lib/ itself). Symlinks: site-packages stays untouched."""
    home = flink_home()
    target = Path(cfg.state_dir) / "flink" / name
    target.mkdir(parents=True, exist_ok=True)
    for old in target.glob("*.jar"):
        old.unlink()
    jars = list((home / "lib").glob("*.jar"))
    if with_flink_python:
        jars += (home / "opt").glob("flink-python*.jar")
    patch = patch_jar(cfg.build_dir)
    if patch.exists():
        jars.append(patch)
    for jar in jars:
        (target / jar.name).symlink_to(jar)
    return target


def use_loopback_lib_for_local_run(cfg) -> None:
    """Make a local (MiniCluster) run start its JVM from a lib folder with the loopback patch. (pyflink's own
    start-up sets FLINK_LIB_DIR to the distribution's lib/ unless FLINK_HOME is set: both are set here.)"""
    os.environ["FLINK_HOME"] = str(flink_home())
    os.environ["FLINK_LIB_DIR"] = str(lib_dir(cfg, "local-lib", with_flink_python=False))
