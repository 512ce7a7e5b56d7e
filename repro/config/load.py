"""Loading configs: presets (with ``extends:``), ``section.key=value`` overrides, params files; and the config as
data: to_dict, stage_dict (exactly what a stage reads), config_hash, dump_yaml.

A config is read from a params file (``params.yaml``, what DVC tracks) or from a named preset
(``repro/config/presets/<name>.yaml``), optionally with overrides. Every value is checked before any work starts; a
bad value raises :class:`ConfigError`, which names the field and the fix.

Example::

    cfg = load_config(Path("params.yaml"), overrides=["ddo.beta=0.1"])
    cfg.ddo.beta          # 0.1
    stage_dict(cfg, "ddo")
"""

import dataclasses
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import yaml

from repro.config.errors import ConfigError, validate
from repro.config.schema import STAGE_PARAMS, Config

# Fields left out of a stage's params (run directory keys, MLflow hashes) while empty, so that adding them changed
# no run directory of the settings that do not use them.
OMIT_WHEN_EMPTY = ("ddo.sweep_alpha", "ddo.sweep_beta", "ddo.control_lrs", "pretrain.decoder")
# Fields left out while at this value (their default: today's behaviour), for the same reason.
OMIT_WHEN_AT = {"ddo.control_budget": "steps"}
# Sections left out of a stage's params while at their defaults and unused, for the same reason: ar is read for VAR
# models only.
OMIT_WHEN_DEFAULT = ("ar",)

PRESETS = "repro.config.presets"


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key written twice in one mapping (YAML keeps the last one silently)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, (str, int, float, bool)):
            continue
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is written twice in one mapping",
                                                    key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def safe_load(text: str):
    """YAML as data (yaml.safe_load: no Python objects), refusing duplicate keys."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: what the parser says and where (no traceback, no file name: the caller has it)."""
    what = " ".join(str(getattr(e, "problem", None) or e).split())
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    if "python/" in str(e):
        what = f"Python tags (!!python/...) are not allowed ({what})"
    return what + where


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(PRESETS).iterdir() if p.name.endswith(".yaml"))


def _deep_merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, section by section; an empty mapping in ``over`` replaces (``{}`` = none)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and v and isinstance(out.get(k), dict) else v
    return out


def preset_text(name: str) -> str | None:
    """The preset's YAML file as written (with its comments), or None for an unknown name."""
    if name not in preset_names():
        return None
    return resources.files(PRESETS).joinpath(f"{name}.yaml").read_text()


def preset_dict(name: str) -> dict:
    """The raw params tree of a preset, with ``extends:`` resolved."""
    if name not in preset_names():
        raise ConfigError([("--preset", f"unknown preset {name!r}",
                            f"use one of: {', '.join(preset_names())}")], source="command line")
    raw = safe_load(preset_text(name)) or {}
    parent = raw.pop("extends", None)
    if parent:
        raw = _deep_merge(preset_dict(parent), raw)
    raw["preset"] = name
    return raw


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML)."""
    raw = json.loads(json.dumps(raw))
    for item in overrides:
        if "=" not in item:
            raise ConfigError([("--set", f"{item!r} is not of the form section.key=value",
                                "write e.g. --set ddo.beta=0.1")], source="command line")
        key, value = item.split("=", 1)
        parts = key.split(".")
        if not all(p.strip() for p in parts):
            raise ConfigError([("--set", f"{item!r} has an empty key name",
                                "write section.key=value, e.g. --set ddo.beta=0.1")], source="command line")
        node = raw
        for p in parts[:-1]:
            if p not in node and parts[0] == "launcher":
                node[p] = {}  # optional section: --set launcher.executor=slurm works without it in the file
            if not isinstance(node.get(p), dict):
                raise ConfigError([(key, f"{p!r} is not a section", "check the key against params.yaml")],
                                  source="command line")
            node = node[p]
        try:
            node[parts[-1]] = safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError([(key, f"the value {value!r} is not valid YAML: {_yaml_problem(e)}",
                                "quote strings, close brackets, e.g. --set 'ddo.sweep_beta=[0.1, 0.3]'")],
                              source="command line") from None
    return raw


def config_from_dict(raw: Any, source: str = "params") -> Config:
    """Validate a raw params tree into a :class:`Config`; raises ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError([("(top level)", "must be a mapping of sections", "see `repro params --preset tiny`")],
                          source)
    return validate(Config, raw, source=source)


def load_config(params: Path | None = None, preset: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load and validate: a preset if named, else the params file; then the overrides."""
    if preset is not None:
        raw, source = preset_dict(preset), f"preset {preset}"
    else:
        params = Path(params or "params.yaml")
        if not params.is_file():
            raise ConfigError([(str(params), "file not found",
                                "run from the project directory, pass --params PATH, or write one with "
                                "`repro params --preset tiny > params.yaml`")], source="command line")
        try:
            raw = safe_load(params.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError([("(file)", f"is not UTF-8 text (byte {e.start}: {e.reason})",
                                "save it as UTF-8, or write a new one with `repro params --preset tiny > params.yaml`")],
                              str(params)) from None
        except yaml.YAMLError as e:
            raise ConfigError([("(file)", f"is not valid YAML: {_yaml_problem(e)}", "fix the YAML there")],
                              str(params)) from None
        except OSError as e:
            raise ConfigError([("(file)", f"cannot be read ({e.strerror})", "check its permissions")],
                              str(params)) from None
        source = str(params)
    if overrides:
        raw = apply_overrides(raw, overrides)
    return config_from_dict(raw, source)


def to_dict(obj: Any) -> Any:
    """A config (or section) as plain JSON-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def stage_dict(cfg: Config, stage: str) -> dict:
    """Exactly the params a stage reads (dotted names select one key of a section), as nested dicts."""
    out: dict = {}
    for name in STAGE_PARAMS[stage]:
        section, _, key = name.partition(".")
        value = to_dict(getattr(cfg, section))
        if key:
            out.setdefault(section, {})[key] = value[key]
        else:
            out[section] = value
    omit = [(name, ([], "")) for name in OMIT_WHEN_EMPTY] + [(name, (v,)) for name, v in OMIT_WHEN_AT.items()]
    for name, values in omit:
        section, _, key = name.partition(".")
        if key in out.get(section, {}) and out[section][key] in values:
            del out[section][key]
            if not out[section]:
                del out[section]
    for section in OMIT_WHEN_DEFAULT:
        unused = not cfg.is_ar
        if section in out and unused and out[section] == to_dict(type(getattr(cfg, section))()):
            del out[section]
    return out


def config_hash(data: Any) -> str:
    """Short, stable hash of JSON-able data (used to key run directories and tag MLflow runs)."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(to_dict(data), sort_keys=False, default_flow_style=False)
