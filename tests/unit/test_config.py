"""The one configuration file: typed, overridable, strict about unknown keys."""
from pathlib import Path

import pytest
import yaml

from config import PROJECT_ROOT, ConfigError, load_config


def test_defaults_load_and_resolve_paths():
    cfg = load_config(env={})
    assert cfg.kafka.topics.telemetry
    assert cfg.state_dir.is_absolute()
    assert cfg.kafka_bootstrap == f"{cfg.kafka.host}:{cfg.kafka.port}"
    assert cfg.kafka_embedded and cfg.mongo_embedded


def test_environment_overrides_are_typed():
    cfg = load_config(env={"FLEAD_KAFKA_PORT": "19092", "FLEAD_MODEL_HIDDEN": "32,8,32",
                           "FLEAD_PRIVACY_ENABLED": "yes", "FLEAD_MODEL_LEARNING_RATE": "0.1"})
    assert cfg.kafka.port == 19092
    assert cfg.model.hidden == [32, 8, 32]
    assert cfg.privacy.enabled is True
    assert cfg.model.learning_rate == 0.1


def test_aliases_point_at_external_servers():
    cfg = load_config(env={"FLEAD_MONGO_URI": "mongodb://db.example:27017/", "FLEAD_KAFKA_BOOTSTRAP": "k:9092"})
    assert cfg.mongo_uri == "mongodb://db.example:27017/" and not cfg.mongo_embedded
    assert cfg.kafka_bootstrap == "k:9092" and not cfg.kafka_embedded


@pytest.mark.parametrize("uri, shown", [
    ("mongodb://db.example:27017/", "mongodb://db.example:27017/"),
    ("mongodb://flead:s3cr:et@db.example:27017/?authSource=admin",
     "mongodb://flead:***@db.example:27017/?authSource=admin"),
    ("mongodb+srv://flead:p%40ss@cluster0.example.net/flead", "mongodb+srv://flead:***@cluster0.example.net/flead"),
    ("mongodb://flead:pw@h1:27017,h2:27017/?replicaSet=rs0", "mongodb://flead:***@h1:27017,h2:27017/?replicaSet=rs0"),
    ("mongodb://flead@db.example/", "mongodb://flead@db.example/"),
])
def test_the_mongo_uri_in_messages_hides_the_password(uri, shown):
    assert load_config(env={"FLEAD_MONGO_URI": uri}).mongo_uri_redacted == shown


@pytest.mark.parametrize("env, message", [
    ({"FLEAD_KAFKA_PORT": "ninety"}, "kafka.port"),
    ({"FLEAD_KAFKA_PROT": "1"}, "FLEAD_KAFKA_PROT"),
    ({"FLEAD_PRIVACY_ENABLED": "maybe"}, "privacy.enabled"),
])
def test_bad_environment_values_name_the_key(env, message):
    with pytest.raises(ConfigError, match=message):
        load_config(env=env)


def test_user_file_unknown_key_and_wrong_type(tmp_path):
    bad_key = tmp_path / "a.yaml"
    bad_key.write_text(yaml.safe_dump({"kafka": {"portt": 1}}))
    with pytest.raises(ConfigError, match="kafka.portt: unknown setting"):
        load_config(bad_key, env={})
    bad_type = tmp_path / "b.yaml"
    bad_type.write_text(yaml.safe_dump({"stream": {"parallelism": "two"}}))
    with pytest.raises(ConfigError, match="stream.parallelism"):
        load_config(bad_type, env={})
    good = tmp_path / "c.yaml"
    good.write_text(yaml.safe_dump({"stream": {"parallelism": 4}}))
    assert load_config(good, env={}).stream.parallelism == 4


def test_to_env_reproduces_the_settings():
    cfg = load_config(env={"FLEAD_KAFKA_PORT": "1234", "FLEAD_MODEL_HIDDEN": "[8, 2, 8]", "FLEAD_PRIVACY_ENABLED": "1"})
    assert load_config(env=cfg.to_env()).to_dict() == cfg.to_dict()


def test_stream_workers_blas_threads_follow_the_setting(monkeypatch):
    from flink_jobs import BLAS_THREAD_VARIABLES, worker_blas_env

    monkeypatch.setenv("FLEAD_STREAM_BLAS_THREADS", "1")
    assert worker_blas_env(load_config()) == {name: "1" for name in BLAS_THREAD_VARIABLES}
    monkeypatch.setenv("FLEAD_STREAM_BLAS_THREADS", "0")
    assert worker_blas_env(load_config()) == {}


def test_the_stream_jobs_checkpoint_settings_follow_the_config(monkeypatch):
    from flink_jobs.checkpoints import checkpoint_dir, checkpoint_settings, savepoint_dir

    monkeypatch.setenv("FLEAD_STREAM_STATE_BACKEND", "rocksdb")
    monkeypatch.setenv("FLEAD_STREAM_INCREMENTAL_CHECKPOINTS", "true")
    monkeypatch.setenv("FLEAD_STREAM_CHECKPOINT_INTERVAL_MS", "2500")
    cfg = load_config()
    assert checkpoint_settings(cfg, "ab" * 16) == {
        "execution.checkpointing.interval": "2500 ms", "execution.checkpointing.dir": checkpoint_dir(cfg).as_uri(),
        "execution.checkpointing.savepoint-dir": savepoint_dir(cfg).as_uri(),
        "execution.checkpointing.externalized-checkpoint-retention": "RETAIN_ON_CANCELLATION",
        "state.backend.type": "rocksdb", "execution.checkpointing.incremental": "true",
        "state.backend.rocksdb.localdir": str(cfg.state_dir / "flink" / "rocksdb"),  # not Flink's /tmp
        "$internal.pipeline.job-id": "ab" * 16}
    monkeypatch.setenv("FLEAD_STREAM_INCREMENTAL_CHECKPOINTS", "false")
    monkeypatch.setenv("FLEAD_STREAM_ROCKSDB_DIR", "/data/flead-rocksdb")
    settings = checkpoint_settings(load_config(), "ab" * 16)
    assert settings["execution.checkpointing.incremental"] == "false"
    assert settings["state.backend.rocksdb.localdir"] == "/data/flead-rocksdb"
    monkeypatch.setenv("FLEAD_STREAM_STATE_BACKEND", "hashmap")
    assert "state.backend.rocksdb.localdir" not in checkpoint_settings(load_config(), "ab" * 16)


def test_a_job_refuses_to_resume_from_a_checkpoint_of_another_state_backend(monkeypatch, tmp_path, capsys):
    """Flink fails to restore another backend's checkpoint and retries without end: the job says so instead."""
    from flink_jobs.checkpoints import checkpoint_dir, new_job_id, note_backend, restore_problem

    monkeypatch.setenv("FLEAD_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("FLEAD_STREAM_STATE_BACKEND", "hashmap")
    hashmap = load_config()
    run = new_job_id()
    assert len(run) == 32 and int(run, 16) >= 0 and run != new_job_id()
    note_backend(hashmap, run)
    checkpoint = checkpoint_dir(hashmap) / run / "chk-7"
    checkpoint.mkdir()
    (checkpoint / "_metadata").write_bytes(b"")
    assert restore_problem(hashmap, checkpoint) is None
    monkeypatch.setenv("FLEAD_STREAM_STATE_BACKEND", "rocksdb")
    problem = restore_problem(load_config(), checkpoint)
    assert problem.startswith(f"{checkpoint} was made by the 'hashmap' state backend")
    assert "FLEAD_STREAM_STATE_BACKEND=hashmap" in problem and "--fresh" in problem
    assert restore_problem(load_config(), checkpoint / "_metadata") is not None  # the form Flink also takes
    assert restore_problem(load_config(), tmp_path / "savepoint-1") is None  # no note (a savepoint): not judged

    pytest.importorskip("pyflink")
    from flink_jobs.anomaly_job import main

    assert main(["--from-savepoint", "latest"]) == 2
    assert capsys.readouterr().err.strip() == problem


def test_the_job_resumes_from_the_newest_checkpoint_or_savepoint_and_a_stop_keeps_the_newest_savepoints(
        monkeypatch, tmp_path):
    import os

    from flink_jobs.checkpoints import (checkpoint_dir, checkpoint_number, completed_checkpoints, latest_restore_point,
                                        restore_points, retire_savepoints, savepoint_dir)

    monkeypatch.setenv("FLEAD_STATE_DIR", str(tmp_path))
    cfg = load_config()
    assert latest_restore_point(cfg) is None and retire_savepoints(cfg, 3) == []

    def made(folder: Path, at: int) -> Path:
        folder.mkdir(parents=True)
        (folder / "_metadata").write_bytes(b"")
        os.utime(folder / "_metadata", (at, at))
        return folder

    checkpoint = made(checkpoint_dir(cfg) / "ab" / "chk-4", 100)
    made(checkpoint_dir(cfg) / "ab" / "chk-5-unfinished", 50).joinpath("_metadata").unlink()  # no metadata: none
    assert completed_checkpoints(cfg) == [checkpoint] and checkpoint_number(checkpoint) == 4
    older = made(savepoint_dir(cfg) / "savepoint-ab-1", 90)
    assert latest_restore_point(cfg) == checkpoint  # a checkpoint made after the last stop
    newest = made(savepoint_dir(cfg) / "savepoint-cd-2", 200)
    assert latest_restore_point(cfg) == newest
    assert restore_points(cfg) == [older, checkpoint, newest]
    assert retire_savepoints(cfg, 0) == [older]  # the newest savepoint is always kept
    assert restore_points(cfg) == [checkpoint, newest] and not older.exists()
    made(savepoint_dir(cfg) / "savepoint-ef-3", 300)
    assert retire_savepoints(cfg, 2) == [] and len(restore_points(cfg)) == 3


def test_stream_status_says_what_a_start_resumes_from(monkeypatch, tmp_path, capsys):
    from flink_jobs.checkpoints import savepoint_dir
    from flink_jobs.cli import cmd_status

    monkeypatch.setenv("FLEAD_STATE_DIR", str(tmp_path))
    assert cmd_status(None, load_config()) == 1  # not running
    assert capsys.readouterr().out.strip() == ("stream job not running; `flead stream start` starts every model anew "
                                               "(no checkpoint or savepoint yet)")
    (savepoint_dir(load_config()) / "savepoint-ab-1").mkdir(parents=True)
    (savepoint_dir(load_config()) / "savepoint-ab-1" / "_metadata").write_bytes(b"")
    cmd_status(None, load_config())
    assert capsys.readouterr().out.strip().endswith(f"resumes from {savepoint_dir(load_config()) / 'savepoint-ab-1'}")


def test_the_stream_jobs_jvm_flags_come_from_the_setting_and_the_environments_win(monkeypatch):
    from flink_jobs import jvm_args

    monkeypatch.setenv("FLEAD_STREAM_JVM_OPTIONS", "-XX:+UseSerialGC")
    monkeypatch.setenv("FLEAD_STREAM_INPUT_FLUSH_MS", "0")
    assert jvm_args(load_config()) == "-XX:+UseSerialGC"
    assert jvm_args(load_config(), " -Xmx2g ") == "-XX:+UseSerialGC -Xmx2g"
    monkeypatch.setenv("FLEAD_STREAM_JVM_OPTIONS", "")
    assert jvm_args(load_config(), "-Xmx2g") == "-Xmx2g"


def test_the_beam_input_flush_period_reaches_the_jvm_as_the_patched_class_reads_it(monkeypatch):
    from flink_jobs import INPUT_FLUSH_PROPERTY, jvm_args
    from flink_jobs.binding import patch_jar

    monkeypatch.setenv("FLEAD_STREAM_JVM_OPTIONS", "")
    monkeypatch.setenv("FLEAD_STREAM_INPUT_FLUSH_MS", "5")
    assert jvm_args(load_config()) == f"-D{INPUT_FLUSH_PROPERTY}=5"
    source = (PROJECT_ROOT / "flink_jobs" / "beam-patches" / "BeamFnDataOutboundAggregator.java").read_text()
    assert f'System.getProperty("{INPUT_FLUSH_PROPERTY}")' in source
    assert patch_jar(load_config().build_dir).name < "flink-python"  # in front of flink-python in a sorted lib/


@pytest.mark.parametrize("argv, refusal", [
    (["demo", "--devices", "-2"], "argument --devices: -2 is negative: give 0 or more"),
    (["demo", "--drifting", "-1"], "argument --drifting: -1 is negative: give 0 or more"),
    (["demo", "--rate", "-5"], "argument --rate: -5 is not above 0"),
    (["demo", "--batch", "0"], "argument --batch: 0 is not above 0"),
    (["demo", "--malformed", "1.5"], "argument --malformed: 1.5 is not between 0 and 1"),
    (["produce", "--format", "asd", "--rate", "nan"], "argument --rate: nan is not above 0"),
    (["produce", "--format", "asd", "--speedup", "-2"], "argument --speedup: -2 is not above 0"),
    (["produce", "--format", "asd", "--limit", "-1"], "argument --limit: -1 is negative: give 0 or more"),
    (["produce", "--format", "asd", "--batch", "x"], "argument --batch: invalid positive int value: 'x'"),
    (["consume", "scores", "--timeout", "0"], "argument --timeout: 0 is not above 0"),
    (["evaluate", "--dataset", "asd", "--rounds", "0"], "argument --rounds: 0 is not above 0"),
    (["evaluate", "--dataset", "asd", "--train-per-device", "-10"], "argument --train-per-device: -10 is negative"),
    (["report", "--devices", "-1"], "argument --devices: -1 is negative: give 0 or more"),
    (["sink", "run", "--until-idle", "-3"], "argument --until-idle: -3 is not above 0"),
    (["router", "run", "--until-idle", "inf"], "argument --until-idle: inf is not above 0"),
])
def test_every_command_refuses_numbers_out_of_range_before_it_starts(argv, refusal, capsys):
    """A negative count, a rate of 0 or a share above 1 is an argparse error naming the option (exit 2), before
    any server or job starts: `--devices -2` used to take all devices but the last two, a negative rate to crash
    the demo after its services had started."""
    from orchestration.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2 and refusal in capsys.readouterr().err


def test_numbers_in_range_are_taken_as_given():
    from orchestration.cli import build_parser

    args = build_parser().parse_args(["demo", "--devices", "0", "--rate", "2500.5", "--batch", "64", "--malformed",
                                      "0", "--drifting", "2"])
    assert (args.devices, args.rate, args.batch, args.malformed, args.drifting) == (0, 2500.5, 64, 0.0, 2)
