"""The process layer under every `flead` command: background services, their supervision, their sockets.

- `services.processes`: pid files, logs, start/stop of a named process, ports (stdlib only).
- `services.service`: `Service(state_dir, name, argv, env, ...)` with ``start``, ``stop``, ``status``, logs and
  its registration, which the supervisor reads.
- `services.supervisor`: restarts registered services that died, with back-off, counting restarts.
- `services.listeners`: which addresses our processes listen on (everything must be loopback).

This package imports only the standard library and `config` (see docs/architecture.md): storage, the jobs, the
dashboards and `orchestration` all build on it.
"""
