"""The embedded local stack: a KRaft Kafka broker and a MongoDB-compatible server (FerretDB, SQLite backend).

`up(cfg)` starts what the configuration does not point elsewhere (``kafka.bootstrap`` / ``mongo.uri`` empty),
waits for health, creates the topics of ``kafka.topics`` and initialises the MongoDB collections. `up` when
already up changes nothing; `down` stops only what `up` started.
"""
from __future__ import annotations

import base64
import subprocess
import uuid
from pathlib import Path
from typing import Callable

from config import PROJECT_ROOT, Config
from services import processes, supervisor
from services.processes import ServiceError
from services.service import (SERVER_PRIORITY, Service, ensure_private_modes, known_services, registered,
                              stop_by_name)
from storage.mongo import mongo_healthy
from telemetry.brokers import kafka_healthy

KAFKA = "kafka"
MONGO = "mongo"
HEALTH_TIMEOUT_S = 90.0


def _kafka_dir(cfg: Config) -> Path:
    return cfg.state_dir / "kafka"


def _kafka_classpath(cfg: Config) -> str:
    libs = cfg.build_dir / "kafka-libs"
    if not any(libs.glob("kafka_2.13-*.jar")):
        raise ServiceError(f"Kafka broker jars missing in {libs}; run `make setup` (or bash orchestration/setup.sh core)")
    return f"{libs}/*"


def _java_cmd(cfg: Config, main_class: str, *args: str) -> list[str]:
    heap = cfg.kafka.heap_mb
    return ["java", f"-Xms{heap}m", f"-Xmx{heap}m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-XX:+ExplicitGCInvokesConcurrent", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={PROJECT_ROOT / 'kafka' / 'log4j2.properties'}",
            "-cp", _kafka_classpath(cfg), main_class, *args]


def _write_server_properties(cfg: Config) -> Path:
    data = processes.private_dir(_kafka_dir(cfg) / "data")
    template = (PROJECT_ROOT / "kafka" / "server.properties.template").read_text()
    props = template.format(host=cfg.kafka.host, port=cfg.kafka.port, controller_port=cfg.kafka.controller_port,
                            log_dir=data, retention_hours=cfg.kafka.retention_hours,
                            max_message_bytes=cfg.kafka.max_message_bytes)
    path = _kafka_dir(cfg) / "server.properties"
    path.write_text(props)
    return path


def kafka_cluster_id() -> str:
    """A new KRaft cluster id: 16 random bytes, URL-safe base64 without padding, not starting with "-" (the format
    command would take it for an option; Kafka's own `Uuid.randomUuid` redraws those too)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _format_kafka_storage(cfg: Config, properties: Path) -> None:
    """Format the KRaft storage once (a new cluster id); later starts reuse it."""
    if (_kafka_dir(cfg) / "data" / "meta.properties").exists():
        return
    cluster_id = kafka_cluster_id()
    result = subprocess.run(_java_cmd(cfg, "kafka.tools.StorageTool", "format", "--standalone", "-t", cluster_id,
                                      "-c", str(properties)), capture_output=True, text=True)
    if result.returncode != 0:
        raise ServiceError(f"formatting Kafka storage failed:\n{result.stdout}{result.stderr}")


def start_kafka(cfg: Config) -> bool:
    """Start the embedded broker unless it runs already; True if this call started it."""
    state = cfg.state_dir
    if processes.running_pid(state, KAFKA):
        return False
    processes.ensure_port_free(cfg.kafka.host, cfg.kafka.port, "FLEAD_KAFKA_PORT")
    processes.ensure_port_free(cfg.kafka.host, cfg.kafka.controller_port, "FLEAD_KAFKA_CONTROLLER_PORT")
    properties = _write_server_properties(cfg)
    _format_kafka_storage(cfg, properties)
    Service(state, KAFKA, _java_cmd(cfg, "kafka.Kafka", str(properties)), priority=SERVER_PRIORITY,
            ready=lambda: kafka_healthy(cfg.kafka_bootstrap), ready_what="broker metadata",
            ready_timeout=HEALTH_TIMEOUT_S).start()
    return True


def ensure_topics(cfg: Config) -> list[str]:
    """Create the topics declared in config that do not exist yet; returns the names created."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": cfg.kafka_bootstrap})
    existing = set(admin.list_topics(timeout=10).topics)
    wanted = {cfg.kafka.topics[key]: cfg.kafka.partitions[key] for key in cfg.kafka.topics.to_dict()}
    limit = {"max.message.bytes": str(cfg.kafka.max_message_bytes)}
    missing = [NewTopic(name, num_partitions=parts, replication_factor=1, config=limit)
               for name, parts in wanted.items() if name not in existing]
    if not missing:
        return []
    for name, future in admin.create_topics(missing, request_timeout=30).items():
        try:
            future.result()
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise ServiceError(f"could not create topic {name} on {cfg.kafka_bootstrap}: {exc}") from exc
    return [topic.topic for topic in missing]


def _ferretdb_binary(cfg: Config) -> Path:
    binary = cfg.build_dir / "bin" / "ferretdb"
    if not binary.exists():
        raise ServiceError(f"{binary} missing; run `make setup` (or set FLEAD_MONGO_URI to use your own MongoDB)")
    return binary


def start_mongo(cfg: Config) -> bool:
    """Start the embedded FerretDB server unless it runs already; True if this call started it."""
    state = cfg.state_dir
    if processes.running_pid(state, MONGO):
        return False
    processes.ensure_port_free(cfg.mongo.host, cfg.mongo.port, "FLEAD_MONGO_PORT")
    data = processes.private_dir(state / "mongo" / "data")
    cmd = [str(_ferretdb_binary(cfg)), "--handler=sqlite", f"--sqlite-url=file:{data}/",
           f"--listen-addr={cfg.mongo.host}:{cfg.mongo.port}", f"--state-dir={state / 'mongo'}",
           "--telemetry=disable", "--debug-addr=-", "--log-level=warn"]
    Service(state, MONGO, cmd, priority=SERVER_PRIORITY, ready=lambda: mongo_healthy(cfg.mongo_uri),
            ready_what="MongoDB ping", ready_timeout=HEALTH_TIMEOUT_S).start()
    return True


def up(cfg: Config, say: Callable[[str], None] = print) -> dict[str, str]:
    """Start the embedded servers the config needs, create topics and collections, restart any registered
    service that died, make the state directory private and start the supervisor; idempotent."""
    processes.private_dir(cfg.state_dir)
    fixed = ensure_private_modes(cfg.state_dir)
    if fixed:
        say(f"state   {len(fixed)} file(s) and folder(s) under {cfg.state_dir} made private (0600/0700)")
    restarted = supervisor.from_config(cfg).check(immediately=True)
    report: dict[str, str] = {}
    if cfg.kafka_embedded:
        report[KAFKA] = "started" if start_kafka(cfg) else "restarted" if KAFKA in restarted else "already running"
        processes.wait_until(lambda: kafka_healthy(cfg.kafka_bootstrap), "broker metadata", HEALTH_TIMEOUT_S,
                             cfg.state_dir, KAFKA)
    elif not kafka_healthy(cfg.kafka_bootstrap, timeout=10):
        raise ServiceError(f"FLEAD_KAFKA_BOOTSTRAP={cfg.kafka_bootstrap}: no broker answers there")
    else:
        report[KAFKA] = f"external {cfg.kafka_bootstrap}"
    say(f"kafka   {cfg.kafka_bootstrap:<28} {report[KAFKA]}")
    created = ensure_topics(cfg)
    if created:
        say(f"topics  created {', '.join(created)}")
    if cfg.mongo_embedded:
        report[MONGO] = "started" if start_mongo(cfg) else "restarted" if MONGO in restarted else "already running"
        processes.wait_until(lambda: mongo_healthy(cfg.mongo_uri), "MongoDB ping", HEALTH_TIMEOUT_S,
                             cfg.state_dir, MONGO)
    elif not mongo_healthy(cfg.mongo_uri, timeout_ms=10000):
        raise ServiceError(f"FLEAD_MONGO_URI={cfg.mongo_uri_redacted}: no MongoDB server answers there")
    else:
        report[MONGO] = "external"
    say(f"mongodb {cfg.mongo_uri_redacted:<28} {report[MONGO]}")
    for name in restarted:
        if name not in (KAFKA, MONGO):
            report[name] = "restarted"
            say(f"{name:<7} had died: restarted (log {processes.log_path(cfg.state_dir, name)})")
    from storage.mongo import Store

    with Store(cfg) as store:
        store.init()
    report[supervisor.NAME] = f"pid {supervisor.ensure_running(cfg)}"
    return report


def down(cfg: Config, say: Callable[[str], None] = print) -> list[str]:
    """Stop the supervisor, then every process that flead started in this state directory (servers last);
    returns their names."""
    stopped = [supervisor.NAME] if supervisor.stop(cfg) else []
    names = known_services(cfg.state_dir) - {supervisor.NAME}
    for name in sorted(names, key=lambda n: (n in (KAFKA, MONGO), n)):  # clients first, servers last
        if stop_by_name(cfg.state_dir, name):
            stopped.append(name)
            say(f"stopped {name}")
    return stopped


def status(cfg: Config) -> dict[str, dict]:
    """What runs: each managed process (pid, restarts by the supervisor) and whether each server answers."""
    result: dict[str, dict] = {}
    names = known_services(cfg.state_dir)
    specs = {spec["name"]: spec for spec in registered(cfg.state_dir)}
    for name in sorted(names):
        pid = processes.running_pid(cfg.state_dir, name)
        spec = specs.get(name, {})
        result[name] = {"pid": pid, "running": pid is not None, "supervised": bool(spec),
                        "restarts": spec.get("restarts", 0)}
    result.setdefault(KAFKA, {"pid": None, "running": False})["healthy"] = kafka_healthy(cfg.kafka_bootstrap, 2.0)
    result[KAFKA]["address"] = cfg.kafka_bootstrap
    result.setdefault(MONGO, {"pid": None, "running": False})["healthy"] = mongo_healthy(cfg.mongo_uri, 1500)
    result[MONGO]["address"] = cfg.mongo_uri_redacted
    return result
