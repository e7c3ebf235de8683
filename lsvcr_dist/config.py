"""Typed configuration: one dataclass per stage, YAML presets, dotted overrides.

A preset YAML (``jobs/configs/*.yaml``) holds shared top-level blocks (``run_dir``, ``seed``, ``llm``, ``lora``,
``sr``, ...) and one section per stage (``generate``, ``prepare``, ``encode``, ``align``, ``finetune``,
``evaluate``). ``load_config(path, "align", overrides)`` merges the shared blocks that the stage has with the
stage's own section, applies dotted overrides (``optim.lr=3e-4``, ``scaling.num_workers=2``) and builds the stage
dataclass. Unknown keys anywhere are errors that name the key; values are coerced to the field's type.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from lsvcr_dist.config_blocks import (  # noqa: F401 - re-exported: the one import path for every config class
    CheckpointConfig,
    ComDivConfig,
    ConfigError,
    DeepSpeedConfig,
    IngestConfig,
    LLMConfig,
    LoRAConfig,
    LossConfig,
    OptimConfig,
    ScalingConfig,
    SRConfig,
)
from lsvcr_dist.config_stages import (  # noqa: F401 - re-exported
    AlignStageConfig,
    EncodeConfig,
    EvalConfig,
    FinetuneStageConfig,
    GenerateConfig,
    PrepareConfig,
    SelectMetric,
    STAGES,
)


# --------------------------------------------------------------------------------------------------- loading
def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Coerce a YAML/CLI value to the annotated type ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        return value
    if origin is Literal:  # coerced to the choices' type here; which choice is allowed is checked where declared
        return _coerce(value, type(typing.get_args(tp)[0]), key)
    try:
        if tp is bool:
            if isinstance(value, str):
                low = value.lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return low in ("true", "1", "yes")
            if not isinstance(value, (bool, int)):
                raise ValueError(value)
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if isinstance(value, bool):
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{key}' expects {getattr(tp, '__name__', tp)}, got {value!r}") from None
    return value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys raise ConfigError with the dotted key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' for {cls.__name__} (known: {', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a field rule of __post_init__: name the key as the user wrote it
        raise e.under(prefix) from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a mapping")
    node[parts[-1]] = value


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key.sub=value`` strings; values are YAML scalars (``3e-4``, ``true``, ``[a, b]``).

    Raises:
        ConfigError: an item without ``=``, or a value that is not YAML (both name the override).
    """
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({_yaml_problem(e)})") from None
        out.append((key.strip(), value))
    return out


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line for a YAML error: what is wrong and where (line, column are 1-based)."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + (getattr(e, "problem", None) or str(e).splitlines()[0])


def read_yaml(path: str | Path) -> dict:
    """Read a preset; top-level keys must be stage names or shared blocks of some stage.

    Raises:
        ConfigError: the file is missing or unreadable, is not YAML, is not a mapping, or has an unknown top-level
            key (each names the file).
    """
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    shared = {f.name for cls in STAGES.values() for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in STAGES and k not in shared:
            raise ConfigError(f"{path}: unknown top-level config key '{k}'")
    return raw


def stage_dict(raw: dict, stage: str) -> dict:
    """The merged plain dict for ``stage``: its shared top-level blocks, then its own section on top."""
    cls = STAGES[stage]
    names = {f.name for f in dataclasses.fields(cls)}
    base = {k: v for k, v in raw.items() if k in names and k not in STAGES}
    section = raw.get(stage) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"section '{stage}' must be a mapping")
    return _deep_merge(base, section)


# Local folders that Ray workers open. Ray Train runs each worker in a working directory of its own, so a relative
# path (the presets' ``run_dir: runs/tiny``) is made absolute against the driver's directory when loaded.
LOCAL_PATH_FIELDS = frozenset({"run_dir", "raw_dir", "adapter_dir", "path", "tokenizer_path"})


def _absolute_paths(obj: Any) -> Any:
    """Make every non-empty ``LOCAL_PATH_FIELDS`` value of a (nested) config dataclass absolute, in place."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _absolute_paths(value)
        elif f.name in LOCAL_PATH_FIELDS and isinstance(value, str) and value:
            setattr(obj, f.name, os.path.abspath(os.path.expanduser(value)))
    return obj


def load_config(path: str | Path | None, stage: str, overrides: list[str] | None = None) -> Any:
    """Load the ``stage`` dataclass from a preset plus dotted overrides.

    Args:
        path: preset YAML, or None for the dataclass defaults.
        stage: one of ``STAGES``.
        overrides: ``key=value`` strings relative to the stage (``max_steps=3``), or prefixed with a stage name
            (``align.max_steps=3``), which applies only to that stage (``route_override``).

    Returns:
        The stage dataclass, its local paths (``LOCAL_PATH_FIELDS``) absolute.

    Raises:
        ConfigError: unknown stage, missing or malformed file, unknown key (named), or a value of the wrong type or
            out of its range (named).
    """
    if stage not in STAGES:
        raise ConfigError(f"unknown stage '{stage}' (known: {', '.join(STAGES)})")
    raw = read_yaml(path) if path else {}
    data = stage_dict(raw, stage)
    for key, value in parse_overrides(overrides or []):
        target, rel = route_override(key)
        if target in (None, stage):
            _set_dotted(data, rel, value)
    return _absolute_paths(_build(STAGES[stage], data))


# --------------------------------------------------------------------------------------------------- routing
def route_override(key: str) -> tuple[str | None, str]:
    """Where a dotted override goes: ``(stage, key relative to that stage)``, or ``(None, key)`` for every stage.

    The one routing rule of the project: a key led by a stage name (``align.max_steps``) reaches that stage only;
    any other key (``max_steps``, ``run_dir``) reaches whichever stage is being loaded. No stage dataclass has a
    field named like a stage, so the two never clash.
    """
    head, _, rest = key.partition(".")
    return (head, rest) if head in STAGES and rest else (None, key)


def has_key(cls: type, dotted: str) -> bool:
    """Whether dataclass ``cls`` has the (nested) field ``dotted`` (``optim.lr``)."""
    node: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(node):
            return False
        hints = typing.get_type_hints(node)
        if part not in hints:
            return False
        node = hints[part]
    return True


def overrides_for(stage: str, overrides: list[str]) -> list[str]:
    """The overrides a stage's job accepts, for running one stage of a pipeline.

    Stage-prefixed items are all kept (``load_config`` applies the stage's own and ignores the others'); an
    unprefixed item is kept when the stage has its key, so ``max_epochs=3`` reaches fine-tune only.
    """
    out = []
    for item, (key, _) in zip(overrides, parse_overrides(overrides)):
        target, rel = route_override(key)
        if target is not None or has_key(STAGES[stage], rel):
            out.append(item)
    return out


def check_overrides_known(overrides: list[str]) -> None:
    """Raise ConfigError for an override that no stage accepts (multi-stage jobs: pipeline, ablations)."""
    for key, _ in parse_overrides(overrides):
        target, rel = route_override(key)
        if not any(has_key(STAGES[s], rel) for s in ([target] if target else STAGES)):
            raise ConfigError(f"unknown config key '{key}' (no stage has it)")


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a stage config (for ``train_loop_config`` and ``config.yaml``)."""
    return dataclasses.asdict(cfg)


def from_dict(stage: str, data: dict) -> Any:
    """Rebuild a stage dataclass from ``to_dict`` output (inside Ray workers)."""
    return _build(STAGES[stage], data)


def dump_yaml(cfg: Any, path: str | Path) -> None:
    """Write the resolved config next to outputs/checkpoints."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
