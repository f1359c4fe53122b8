"""`flead doctor`: check the local stack and repair what can be repaired.

Each check gives a `Finding`: ``ok``, ``fixed`` (it was wrong and is now right) or ``FAIL`` (it is wrong; the
detail says what to do). Checked: the supervisor runs; every registered service runs (one that died is restarted
now, without waiting for its back-off); the servers answer; nothing under the state directory is readable by
other users; no process of the state directory listens outside 127.0.0.1; the stream job has a checkpoint to
resume from.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from config import Config
from services import listeners, processes, supervisor
from services.service import ensure_private_modes, registered

OK, FIXED, FAIL = "ok", "fixed", "FAIL"


@dataclass(frozen=True)
class Finding:
    check: str
    outcome: str
    detail: str


def examine(cfg: Config) -> list[Finding]:
    """Run every check (repairing what it can) and return the findings in order."""
    from storage.mongo import mongo_healthy
    from telemetry.brokers import kafka_healthy

    state = cfg.state_dir
    findings = []
    specs = registered(state)
    restarted = supervisor.from_config(cfg).check(immediately=True)
    for spec in specs:
        name = spec["name"]
        pid = processes.running_pid(state, name)
        if name in restarted:
            findings.append(Finding(name, FIXED, f"had died; restarted (pid {pid}, {spec.get('restarts', 0) + 1} "
                                                 f"restart(s) in all); log {processes.log_path(state, name)}"))
        elif pid is None:
            findings.append(Finding(name, FAIL, f"not running and could not be restarted; see "
                                                f"{processes.log_path(state, name)}"))
        else:
            findings.append(Finding(name, OK, f"running (pid {pid}, {spec.get('restarts', 0)} restart(s))"))
    was_running = processes.running_pid(state, supervisor.NAME)
    pid = supervisor.ensure_running(cfg)
    if pid is None:
        findings.append(Finding(supervisor.NAME, OK, "nothing registered to supervise (run `flead up`)"))
    else:
        findings.append(Finding(supervisor.NAME, OK if was_running else FIXED,
                                f"running (pid {pid})" if was_running else f"was not running; started (pid {pid})"))
    for name, healthy, where in (("kafka", kafka_healthy(cfg.kafka_bootstrap, 3.0), cfg.kafka_bootstrap),
                                 ("mongo", mongo_healthy(cfg.mongo_uri, 3000), cfg.mongo_uri)):
        findings.append(Finding(name, OK if healthy else FAIL,
                                f"answers at {where}" if healthy else f"does not answer at {where}; `flead up`"))
    fixed = ensure_private_modes(state)
    findings.append(Finding("state dir", FIXED if fixed else OK,
                            f"{len(fixed)} path(s) made private (0600/0700), e.g. {fixed[0]}" if fixed
                            else f"{state}: private (files 0600, folders 0700)"))
    open_to_others = listeners.exposed(state)
    findings.append(Finding("listening", FAIL if open_to_others else OK,
                            "; ".join(map(str, open_to_others)) + " (bind it to 127.0.0.1)" if open_to_others
                            else "every process of the state dir listens on 127.0.0.1 only"))
    findings.append(_checkpoint_finding(cfg, any(s["name"] == "stream" for s in specs)))
    return findings


def _checkpoint_finding(cfg: Config, stream_registered: bool) -> Finding:
    from flink_jobs.checkpoints import latest_restore_point

    newest = latest_restore_point(cfg)
    if newest is not None:
        age = time.time() - (newest / "_metadata").stat().st_mtime
        return Finding("checkpoint", OK, f"the stream job resumes from {newest} ({age:.0f} s old)")
    running = " (the stream job has not completed one)" if stream_registered else ""
    return Finding("checkpoint", OK, f"no retained checkpoint or savepoint yet{running}")
