"""Pipeline configuration: documented defaults in pipeline.yaml, a user file on top, then the command line.

The defaults file is the single source of every option, its default and its help text (the comment
line directly above each key), so `--help` can never drift from the file.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

DEFAULTS_FILE = Path(__file__).with_name("pipeline.yaml")
STAGES = ("clean", "featurize", "train", "generate", "merge", "evaluate")


class ConfigError(ValueError):
    """A configuration file or option that cannot be used, with a message that names it."""


def _defaults() -> dict:
    return yaml.safe_load(DEFAULTS_FILE.read_text())


def option_help() -> dict[str, str]:
    """Map `section.key` to the comment line(s) directly above that key in the defaults file."""
    helps: dict[str, str] = {}
    section = None
    pending: list[str] = []
    for line in DEFAULTS_FILE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# "))
            continue
        match = re.match(r"^(\s*)([A-Za-z_]+):", line)
        if match:
            if not match.group(1):
                section = match.group(2)
            elif section:
                helps[f"{section}.{match.group(2)}"] = " ".join(pending)
        pending = []
    return helps


def _deep_merge(base: dict, override: dict, origin: str) -> dict:
    merged = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if key not in merged:
            raise ConfigError(f"{origin}: unknown option '{key}' (known: {', '.join(sorted(merged))})")
        if isinstance(merged[key], dict) and not isinstance(value, dict):
            raise ConfigError(f"{origin}: '{key}' must be a mapping")
        merged[key] = _deep_merge(merged[key], value, f"{origin}: {key}") if isinstance(merged[key], dict) else value
    return merged


def _parse_value(text: str, default: Any) -> Any:
    """Parse a command-line value with YAML rules, checked against the default's type."""
    value = yaml.safe_load(text)
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {text!r}")
    elif isinstance(default, float) and isinstance(value, int):
        value = float(value)
    elif isinstance(default, (dt.date, str)) and not isinstance(value, str):
        value = str(text)
    elif not isinstance(value, type(default)):
        raise ConfigError(f"expected a {type(default).__name__}, got {text!r}")
    return value


class Config(SimpleNamespace):
    """The resolved configuration; sections and keys read as attributes (cfg.train.max_steps)."""

    @classmethod
    def from_dict(cls, data: dict) -> "Config":
        return cls(**{k: cls.from_dict(v) if isinstance(v, dict) else v for k, v in data.items()})

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Config) else v for k, v in vars(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, default=str)


def load(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then `config_file`, then `overrides` ({'train.max_steps': 10, ...})."""
    data = _defaults()
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = _deep_merge(data, yaml.safe_load(path.read_text()) or {}, str(path))
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if section not in data or key not in data[section]:
            raise ConfigError(f"unknown option --{dotted}")
        data[section][key] = value
    if not data["run"]["id"]:
        data["run"]["id"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(data["run"]["id"])):
        raise ConfigError(f"run id {data['run']['id']!r} may only hold letters, digits, '.', '_' and '-'")
    data["run"]["id"] = str(data["run"]["id"])
    return Config.from_dict(data)


def build_parser(prog: str, description: str, stage_choices: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        usage=f"%(prog)s {'[STAGE ...] ' if stage_choices else ''}[--config FILE] [--run-id ID] [--force] "
              "[--<section>.<key> VALUE ...]",
        epilog="Options are read from the defaults (synth/pipeline.yaml), then --config, then the command line.",
    )
    if stage_choices:
        parser.add_argument("stages", nargs="*", metavar="STAGE",
                            help=f"stages to run, in pipeline order: {', '.join(stage_choices)} or all (default)")
    parser.add_argument("--config", help="YAML file overriding any of the defaults")
    parser.add_argument("--run-id", dest="run.id", help="shorthand for --run.id")
    parser.add_argument("--master", dest="spark.master", help="shorthand for --spark.master")
    parser.add_argument("--force", action="store_true",
                        help="recompute and replace outputs a previous attempt of this run id already committed")
    helps = option_help()
    defaults = _defaults()
    for section, keys in defaults.items():
        group = parser.add_argument_group(section)
        for key, default in keys.items():
            group.add_argument(f"--{section}.{key}", dest=f"{section}.{key}", metavar="VALUE",
                               default=None,
                               # argparse formats help with %: a literal one (a share, "5%") is doubled.
                               help=f"{helps.get(f'{section}.{key}', '')} [default: {default}]".replace("%", "%%"))
    parser.set_defaults(**{"run.id": None, "spark.master": None})
    return parser


def from_args(args: argparse.Namespace) -> Config:
    """Resolve the configuration from parsed arguments, typing command-line values like their defaults."""
    defaults = _defaults()
    overrides = {}
    for dest, text in vars(args).items():
        if "." not in dest or text is None:
            continue
        section, key = dest.split(".", 1)
        try:
            overrides[dest] = _parse_value(text, defaults[section][key])
        except ConfigError as exc:
            raise ConfigError(f"--{dest}: {exc}") from None
    return load(args.config, overrides)
