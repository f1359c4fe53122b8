"""`Service`: one background process of FLEAD — start, stop, status, logs, pid file — and its registration.

Starting a service registers it: ``<state_dir>/run/<name>.json`` records how it was started (argv, environment,
working directory) so the supervisor (`services.supervisor`) can start it again the same way if it dies, and
counts its restarts there. Stopping it deregisters it first, so a deliberate stop is never undone. Start, stop and
a supervisor's restart of one service hold the same lock (``run/<name>.lock``), so they never interleave.

>>> svc = Service(state_dir, "sink", [sys.executable, "-m", "orchestration.cli", "sink", "run"])  # doctest: +SKIP
>>> print(svc.start())                                                                          # doctest: +SKIP
sink started (pid 4242); log: var/logs/sink.log
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from services import processes
from services.processes import ServiceError

SERVER_PRIORITY = 0   # servers (broker, database) start first when several services need a restart
CLIENT_PRIORITY = 1   # jobs and web servers that depend on them
SERVICE_VARIABLE = "FLEAD_CLI_SERVICE"  # set in a service's environment to its name


@dataclass(frozen=True)
class Started:
    """What `Service.start` did: started a new process (``new``) or found one running."""

    name: str
    pid: int
    new: bool
    log: Path

    def __str__(self) -> str:
        if self.new:
            return f"{self.name} started (pid {self.pid}); log: {self.log}"
        return f"{self.name} already running (pid {self.pid})"


def spec_path(state_dir: Path, name: str) -> Path:
    return processes.run_dir(state_dir) / f"{name}.json"


@contextlib.contextmanager
def service_lock(state_dir: Path, name: str) -> Iterator[None]:
    """Exclusive lock on one service's start/stop/restart (an flock on ``run/<name>.lock``)."""
    path = processes.private_dir(processes.run_dir(state_dir)) / f"{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_spec(state_dir: Path, name: str) -> dict | None:
    """The registration of `name` (how to start it, restarts so far), or None if it is not registered."""
    try:
        return json.loads(spec_path(state_dir, name).read_text())
    except (OSError, ValueError):
        return None


def write_spec(state_dir: Path, spec: dict) -> None:
    """Write a registration atomically (0600: it holds the service's environment)."""
    path = spec_path(state_dir, spec["name"])
    tmp = path.with_suffix(".json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(spec, fh, indent=1)
    os.replace(tmp, path)


def registered(state_dir: Path) -> list[dict]:
    """Every registered service's spec, servers first, then by name."""
    run = processes.run_dir(state_dir)
    specs = [spec for path in sorted(run.glob("*.json")) if (spec := read_spec(state_dir, path.stem)) is not None]
    return sorted(specs, key=lambda s: (s.get("priority", CLIENT_PRIORITY), s["name"]))


def known_services(state_dir: Path) -> set[str]:
    """Names of the services of `state_dir` with a pid file or a registration (running or not)."""
    run = processes.run_dir(state_dir)
    return {path.stem for pattern in ("*.pid", "*.json") for path in run.glob(pattern)}


class Service:
    """One named background process of a state directory.

    argv/env/cwd: how to run it (``env`` is added to the current environment). ready: a check that the service
    answers (e.g. its port), awaited by `start` for up to ``ready_timeout`` seconds; ``ready_what`` names it in
    errors. stop_grace: seconds between SIGTERM and SIGKILL; leader_grace: if set, the process alone gets SIGTERM
    first and that many seconds to end by itself before its process group is signalled. supervised: register it,
    so the supervisor restarts it if it dies, with ``restart_argv`` if given (e.g. "resume from the newest
    checkpoint" where ``argv`` names one).
    priority: `SERVER_PRIORITY` for what others depend on.
    """

    def __init__(self, state_dir: Path, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
                 cwd: Path | None = None, *, ready: Callable[[], bool] | None = None, ready_what: str = "ready",
                 ready_timeout: float = 90.0, stop_grace: float = 20.0, leader_grace: float = 0.0,
                 supervised: bool = True, priority: int = CLIENT_PRIORITY, restart_argv: Sequence[str] | None = None):
        self.state_dir = Path(state_dir)
        self.name = name
        self.argv = [str(a) for a in argv]
        self.restart_argv = [str(a) for a in restart_argv] if restart_argv is not None else self.argv
        self.env = dict(env or {})
        self.cwd = Path(cwd) if cwd is not None else None
        self.ready, self.ready_what, self.ready_timeout = ready, ready_what, ready_timeout
        self.stop_grace, self.leader_grace = stop_grace, leader_grace
        self.supervised = supervised
        self.priority = priority

    @property
    def log_path(self) -> Path:
        return processes.log_path(self.state_dir, self.name)

    @property
    def pid(self) -> int | None:
        """The pid if the service runs, else None."""
        return processes.running_pid(self.state_dir, self.name)

    def log_tail(self, lines: int = 25) -> str:
        return processes.log_tail(self.state_dir, self.name, lines)

    def start(self) -> Started:
        """Start (and register) the service unless it runs; wait until `ready`. A service that fails to come up
        is stopped and deregistered, and `ServiceError` says why (with its log's tail)."""
        with service_lock(self.state_dir, self.name):
            pid = self.pid
            if pid is not None:
                return Started(self.name, pid, False, self.log_path)
            env = {**os.environ, **self.env, SERVICE_VARIABLE: self.name}
            if self.supervised:
                previous = read_spec(self.state_dir, self.name) or {}
                write_spec(self.state_dir, {
                    "name": self.name, "argv": self.restart_argv, "env": env,
                    "cwd": str(self.cwd) if self.cwd else None, "stop_grace": self.stop_grace,
                    "leader_grace": self.leader_grace, "priority": self.priority, "registered_at": time.time(),
                    "restarts": previous.get("restarts", 0), "last_restart_at": previous.get("last_restart_at")})
            pid = processes.start(self.state_dir, self.name, self.argv, env=env, cwd=self.cwd)
        if self.ready is not None:
            try:
                processes.wait_until(self.ready, self.ready_what, self.ready_timeout, self.state_dir, self.name)
            except ServiceError:
                self.stop()
                raise
        return Started(self.name, pid, True, self.log_path)

    def stop(self) -> bool:
        """Deregister, then stop the service (SIGTERM to the process alone for ``leader_grace`` if set, then to its
        group, then SIGKILL after ``stop_grace``); True if it ran."""
        with service_lock(self.state_dir, self.name):
            spec_path(self.state_dir, self.name).unlink(missing_ok=True)
            return processes.stop(self.state_dir, self.name, grace=self.stop_grace, leader_grace=self.leader_grace)

    def status(self) -> dict:
        """Whether it runs (pid), is registered, answers (`ready`), and how often the supervisor restarted it."""
        pid = self.pid
        spec = read_spec(self.state_dir, self.name) or {}
        return {"running": pid is not None, "pid": pid, "registered": bool(spec),
                "healthy": (pid is not None and self.ready()) if self.ready is not None else None,
                "restarts": spec.get("restarts", 0), "last_restart_at": spec.get("last_restart_at"),
                "log": str(self.log_path)}


def stop_by_name(state_dir: Path, name: str, grace: float = 20.0) -> bool:
    """Deregister and stop the service `name` however it was started; True if it ran."""
    spec = read_spec(state_dir, name) or {}
    return Service(state_dir, name, [], stop_grace=spec.get("stop_grace", grace),
                   leader_grace=spec.get("leader_grace", 0.0)).stop()


def _private_modes(root: Path):
    """(path, mode) of `root` and everything under it, symlinks aside (not followed); what is deleted meanwhile
    (a checkpoint the running job retires) is skipped."""
    root = Path(root)
    paths = [root]
    for folder, dirs, files in os.walk(root):  # does not descend into symlinked folders
        paths.extend(Path(folder) / name for name in dirs + files)
    for path in paths:
        try:
            mode = path.lstat().st_mode
        except OSError:
            continue
        if not stat.S_ISLNK(mode):
            yield path, mode


def readable_by_others(root: Path) -> list[str]:
    """'<mode> <path>' of every file and folder under `root` that group or others may read."""
    return [f"{oct(stat.S_IMODE(mode))} {path}" for path, mode in _private_modes(root) if mode & 0o077]


def ensure_private_modes(root: Path) -> list[Path]:
    """Take group and other permissions off every file and folder under `root` (symlinks are not followed);
    returns what was changed. The state directory holds databases, logs, checkpoints and credentials."""
    changed = []
    if not Path(root).exists():
        return changed
    for path, mode in _private_modes(root):
        if not mode & 0o077:
            continue
        try:
            os.chmod(path, mode & 0o7700)
            changed.append(path)
        except OSError:
            continue
    return changed


__all__ = ["Service", "Started", "ServiceError", "registered", "read_spec", "write_spec", "service_lock",
           "stop_by_name", "ensure_private_modes", "readable_by_others", "spec_path", "SERVER_PRIORITY",
           "CLIENT_PRIORITY", "SERVICE_VARIABLE", "known_services"]
