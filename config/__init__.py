"""FLEAD settings: `config/project_config.yaml`, overridden by a user file and environment variables.

The YAML file is both the defaults and the schema: every key's type is the type of its default. A user file
(named by ``FLEAD_CONFIG``) and environment variables (``FLEAD_<SECTION>_<KEY>``) may only set keys that exist,
with values of the same type; anything else is a `ConfigError` naming the key.

>>> cfg = load_config(env={"FLEAD_KAFKA_PORT": "19092"})
>>> cfg.kafka.port
19092
>>> cfg.kafka.topics.telemetry
'flead.telemetry'
"""
from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULTS_FILE = Path(__file__).resolve().parent / "project_config.yaml"

# Short names users reach for first; each maps to one key.
ENV_ALIASES = {
    "FLEAD_MONGO_URI": ("mongo", "uri"),
    "FLEAD_KAFKA_BOOTSTRAP": ("kafka", "bootstrap"),
    "FLEAD_STATE_DIR": ("paths", "state_dir"),
}
# FLEAD_* variables that are switches of tools and tests, not settings.
NON_SETTING_PREFIXES = ("FLEAD_TEST_", "FLEAD_CLI_")


class ConfigError(ValueError):
    """A setting that does not exist or has the wrong type."""


class Section:
    """Read-only attribute view of one level of the settings (``cfg.kafka.topics.telemetry``)."""

    def __init__(self, values: Mapping[str, Any], path: str = ""):
        self._values = dict(values)
        self._path = path

    def __getattr__(self, name: str) -> Any:
        try:
            value = self._values[name]
        except KeyError:
            raise AttributeError(f"no setting {self._path}{name}") from None
        if isinstance(value, dict):
            return Section(value, f"{self._path}{name}.")
        return value

    def __getitem__(self, name: str) -> Any:
        return self.__getattr__(name)

    def __contains__(self, name: str) -> bool:
        return name in self._values

    def __repr__(self) -> str:
        return f"Section({self._path or '<root>'}: {sorted(self._values)})"

    def to_dict(self) -> dict:
        """A deep copy of this section as plain dicts and lists."""
        return copy.deepcopy(self._values)


class Config(Section):
    """All settings, plus paths resolved against the project root."""

    def path(self, key: str) -> Path:
        """`paths.<key>` as an absolute path (relative values are taken from the project root)."""
        p = Path(self._values["paths"][key])
        return p if p.is_absolute() else (PROJECT_ROOT / p).resolve()

    @property
    def state_dir(self) -> Path:
        return self.path("state_dir")

    @property
    def build_dir(self) -> Path:
        return self.path("build_dir")

    @property
    def data_dir(self) -> Path:
        return self.path("data_dir")

    @property
    def kafka_bootstrap(self) -> str:
        """The brokers clients connect to: `kafka.bootstrap` if set, else the embedded broker."""
        return self.kafka.bootstrap or f"{self.kafka.host}:{self.kafka.port}"

    @property
    def mongo_uri(self) -> str:
        """The MongoDB URI: `mongo.uri` if set, else the embedded server."""
        return self.mongo.uri or f"mongodb://{self.mongo.host}:{self.mongo.port}/"

    @property
    def mongo_uri_redacted(self) -> str:
        """`mongo_uri` with its password replaced by ``***``: the form for messages, logs and reports."""
        return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", self.mongo_uri)

    def to_env(self) -> dict[str, str]:
        """FLEAD_* variables that reproduce these settings in a child process (only keys off their default)."""
        with open(DEFAULTS_FILE) as fh:
            defaults = yaml.safe_load(fh)
        env: dict[str, str] = {}

        def walk(node: dict, default: dict, path: tuple[str, ...]) -> None:
            for name, value in node.items():
                if isinstance(value, dict):
                    walk(value, default[name], path + (name,))
                elif value != default[name]:
                    text = json.dumps(value) if isinstance(value, (list, bool)) else str(value)
                    env["FLEAD_" + "_".join(path + (name,)).upper()] = text
        walk(self._values, defaults, ())
        return env

    @property
    def kafka_embedded(self) -> bool:
        return not self.kafka.bootstrap

    @property
    def mongo_embedded(self) -> bool:
        return not self.mongo.uri


def _type_name(value: Any) -> str:
    return type(value).__name__


def _coerce(key: str, default: Any, value: Any) -> Any:
    """Check (and for strings from the environment, parse) `value` against the type of `default`."""
    if isinstance(value, str) and not isinstance(default, str):
        text = value.strip()
        try:
            if isinstance(default, bool):
                lowered = text.lower()
                if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(text)
                value = lowered in ("1", "true", "yes", "on")
            elif isinstance(default, int):
                value = int(text)
            elif isinstance(default, float):
                value = float(text)
            elif isinstance(default, list):
                value = json.loads(text) if text.startswith("[") else [
                    _parse_scalar(part) for part in text.split(",") if part.strip()]
            else:
                raise ValueError(text)
        except ValueError:
            raise ConfigError(f"{key}: cannot read {value!r} as {_type_name(default)}") from None
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{key}: expected {_type_name(default)}, got {_type_name(value)} ({value!r})")
    return value


def _parse_scalar(text: str) -> Any:
    text = text.strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _merge(defaults: dict, overrides: Mapping[str, Any], prefix: str = "") -> dict:
    merged = copy.deepcopy(defaults)
    for name, value in overrides.items():
        key = f"{prefix}{name}"
        if name not in defaults:
            raise ConfigError(f"{key}: unknown setting (known here: {', '.join(sorted(defaults))})")
        if isinstance(defaults[name], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key}: expected a section, got {_type_name(value)}")
            merged[name] = _merge(defaults[name], value, key + ".")
        else:
            merged[name] = _coerce(key, defaults[name], value)
    return merged


def _env_overrides(defaults: dict, env: Mapping[str, str]) -> dict:
    """Map FLEAD_* variables onto keys; a FLEAD_ variable that names no key is an error."""
    flat: dict[str, tuple[str, ...]] = {}

    def walk(node: dict, path: tuple[str, ...]) -> None:
        for name, value in node.items():
            if isinstance(value, dict):
                walk(value, path + (name,))
            else:
                flat["FLEAD_" + "_".join(path + (name,)).upper()] = path + (name,)

    walk(defaults, ())
    flat.update(ENV_ALIASES)
    overrides: dict = {}
    for var, value in env.items():
        if not var.startswith("FLEAD_") or var == "FLEAD_CONFIG" or var.startswith(NON_SETTING_PREFIXES):
            continue
        if var not in flat:
            raise ConfigError(f"{var}: no such setting (variables are FLEAD_<SECTION>_<KEY>, "
                              f"e.g. FLEAD_KAFKA_PORT; see config/project_config.yaml)")
        node = overrides
        *parents, leaf = flat[var]
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return overrides


def load_config(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load the defaults, merge the user file (``path`` or ``$FLEAD_CONFIG``), then environment overrides."""
    env = os.environ if env is None else env
    with open(DEFAULTS_FILE) as fh:
        defaults = yaml.safe_load(fh)
    values = defaults
    user_file = path or env.get("FLEAD_CONFIG")
    if user_file:
        try:
            with open(user_file) as fh:
                user = yaml.safe_load(fh) or {}
        except OSError as exc:
            raise ConfigError(f"FLEAD_CONFIG: cannot read {user_file}: {exc.strerror}") from None
        if not isinstance(user, dict):
            raise ConfigError(f"{user_file}: expected a mapping of sections at the top level")
        values = _merge(values, user)
    values = _merge(values, _env_overrides(defaults, env))
    return Config(values)
