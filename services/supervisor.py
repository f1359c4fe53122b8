"""The supervisor: restarts the registered services of a state directory that died, with back-off.

    FLEAD_STATE_DIR=var python -m services.supervisor   # `flead up` starts it; any later `flead` command
                                                         # starts it again if it died; `flead down` stops it

Every ``supervision.interval_s`` it looks at each registered service (`services.service.registered`, servers
first). One whose process is gone is started again the same way it was started (argv, environment, working
directory of its registration), after killing what is left of its old session (e.g. a job's JVM). Restarts back off
exponentially (``backoff_initial_s`` doubling up to ``backoff_max_s``) while a service keeps dying within
``stable_after_s`` of its start; each restart is logged here and in the service's log and counted in its
registration (`flead status` shows the count). A deliberate stop deregisters the service first, under the same
lock, so it is never undone.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from config import PROJECT_ROOT, load_config
from services import processes
from services.service import read_spec, registered, service_lock, write_spec

NAME = "supervisor"
log = logging.getLogger("flead.supervisor")


@dataclass
class Backoff:
    """Exponential back-off for one service: the delay before its next restart."""

    initial_s: float
    max_s: float
    stable_after_s: float
    failures: int = 0           # consecutive quick deaths
    last_start: float = field(default=float("-inf"))

    def delay(self) -> float:
        """Seconds to wait after a death before the next start."""
        return 0.0 if self.failures == 0 else min(self.max_s, self.initial_s * 2 ** (self.failures - 1))

    def died(self, now: float) -> None:
        """Record a death at `now`: quick deaths (within stable_after_s of the start) grow the delay."""
        self.failures = self.failures + 1 if now - self.last_start < self.stable_after_s else 0

    def started(self, now: float) -> None:
        self.last_start = now


class Supervisor:
    """Watches the registered services of `state_dir` and restarts those that died."""

    def __init__(self, state_dir: Path, initial_s: float, max_s: float, stable_after_s: float):
        self.state_dir = Path(state_dir)
        self.settings = (initial_s, max_s, stable_after_s)
        self.backoff: dict[str, Backoff] = {}
        self.due: dict[str, float] = {}  # service → monotonic time of its next restart

    def _backoff(self, name: str) -> Backoff:
        return self.backoff.setdefault(name, Backoff(*self.settings))

    def reap_children(self) -> None:
        """Collect the exit status of services this supervisor restarted (they are its children)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            log.info("pid %d exited (%s)", pid, _describe_status(status))

    def check(self, now: float | None = None, immediately: bool = False) -> list[str]:
        """One pass: restart every registered service that is not running and whose back-off has passed
        (``immediately``: ignore the back-off). Returns the names restarted."""
        self.reap_children()
        now = time.monotonic() if now is None else now
        restarted = []
        for spec in registered(self.state_dir):
            name = spec["name"]
            recorded = processes.recorded_pid(self.state_dir, name)
            if processes.running_pid(self.state_dir, name) is not None:
                continue
            backoff = self._backoff(name)
            if name not in self.due:  # a death not seen before
                backoff.died(now)
                self.due[name] = now + backoff.delay()
                log.warning("%s (pid %s) is not running; restarting it %s", name,
                            recorded[0] if recorded else "?", f"in {backoff.delay():.0f} s (died {backoff.failures} "
                            f"time(s) in a row within {backoff.stable_after_s:.0f} s of starting)"
                            if backoff.delay() else "now")
            if immediately or now >= self.due[name]:
                if self.restart(name):
                    backoff.started(now)
                    restarted.append(name)
                self.due.pop(name, None)
        return restarted

    def restart(self, name: str) -> bool:
        """Start `name` again as registered; False if it was deregistered (stopped) or started meanwhile."""
        with service_lock(self.state_dir, name):
            spec = read_spec(self.state_dir, name)
            if spec is None or processes.running_pid(self.state_dir, name) is not None:
                return False
            old = processes.recorded_pid(self.state_dir, name)
            leftovers = processes.kill_session_leftovers(*old) if old else []
            spec["restarts"] = spec.get("restarts", 0) + 1
            spec["last_restart_at"] = time.time()
            note = f" (restart #{spec['restarts']} by the supervisor)"
            try:
                pid = processes.start(self.state_dir, name, spec["argv"], env=spec["env"], cwd=spec.get("cwd"),
                                      note=note)
            except OSError as exc:
                log.error("restarting %s failed: %s", name, exc)
                return False
            write_spec(self.state_dir, spec)
        log.warning("restarted %s: pid %d, restart #%d%s", name, pid, spec["restarts"],
                    f" (killed {len(leftovers)} leftover process(es) of its previous run)" if leftovers else "")
        return True

    def run(self, interval_s: float, should_stop) -> None:
        log.info("supervising the services of %s every %.1f s", self.state_dir, interval_s)
        while not should_stop():
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the supervisor must outlive any one bad pass
                log.exception("supervision pass failed; next one in %.1f s", interval_s)
            time.sleep(interval_s)
        log.info("stopping")


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.WEXITSTATUS(status)}"


def from_config(cfg) -> Supervisor:
    s = cfg.supervision
    return Supervisor(cfg.state_dir, s.backoff_initial_s, s.backoff_max_s, s.stable_after_s)


def ensure_running(cfg) -> int | None:
    """Start the supervisor of `cfg`'s state directory if services are registered there and it is not running
    (the next `flead` command after it died brings it back); returns its pid, or None when nothing is registered."""
    pid = processes.running_pid(cfg.state_dir, NAME)
    if pid is not None or not registered(cfg.state_dir):
        return pid
    return processes.start(cfg.state_dir, NAME, [sys.executable, "-m", "services.supervisor"], env=cfg.to_env(),
                           cwd=PROJECT_ROOT)


def stop(cfg) -> bool:
    """Stop the supervisor (before the services, so it does not restart what is being stopped)."""
    return processes.stop(cfg.state_dir, NAME, grace=10.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_config()
    stopping: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    from_config(cfg).run(cfg.supervision.interval_s, lambda: bool(stopping))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
