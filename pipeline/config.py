"""Recipe loading: dataclass defaults < recipe YAML < command-line `stage.key=value`.

A recipe names the data root, the teacher, the student, the stages to run and one section per
stage. Unknown keys are errors that name the key and the nearest valid one; nothing is ignored.
The data root: `data_root=` override, else $DISTILLERY_DATA_ROOT, else the recipe.
"""
from __future__ import annotations

import dataclasses
import difflib
import keyword
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipeline.resources import SCORER_FIELDS, StageResources
from pipeline.errors import UserError
from pipeline.textfile import read_text

TOP_LEVEL = ("data_root", "teacher", "student", "reasoning_tags", "stages", "resources")


@dataclass
class Recipe:
    path: str
    data_root: str
    teacher: str
    student: str
    stages: list[str]                          # the stages this recipe runs, in pipeline order
    configs: dict[str, Any]                    # stage name -> its config dataclass instance
    resources: dict[str, StageResources] = field(default_factory=dict)
    stage_defs: dict[str, Any] = field(default_factory=dict)  # the STAGES dict it was loaded with


def _nearest(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(sorted(valid))})"


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"override '{text}' is not key=value (e.g. generate.temperature=0.6)")
    key, raw = text.split("=", 1)
    # YAML typing: 0.6 -> float, 8 -> int, true -> bool, [a, b] -> list, anything else a string.
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _set(tree: dict, path: list[str], value: Any) -> None:
    for part in path[:-1]:
        node = tree.get(part)
        if node is None:
            node = tree[part] = {}
        tree = node
    tree[path[-1]] = value


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is not None:
        return isinstance(value, origin)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def build_config(cls: type, values: dict, where: str):
    """Instantiate dataclass `cls` from `values`, rejecting unknown keys and wrong types.

    A key that is a Python keyword is the field of that name with a trailing underscore
    (PEP 8's convention: `opd.async` is OpdConfig.async_)."""
    if not isinstance(values, dict):
        raise UserError(f"{where}: expected a mapping of keys, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    fields = {}
    for key, value in values.items():
        name = key + "_" if keyword.iskeyword(key) else key
        if name not in names:
            keys = [n[:-1] if keyword.iskeyword(n[:-1]) else n for n in names]
            raise UserError(f"{where}: unknown key '{key}'{_nearest(key, keys)}")
        if not _type_ok(value, hints[name]):
            tname = getattr(hints[name], "__name__", str(hints[name]))
            raise UserError(f"{where}.{key}: expected {tname}, got {value!r}")
        fields[name] = value
    return cls(**fields)


def is_local_model(model: str) -> bool:
    """A model named by a folder (starts with / . ~ or exists here), not a hub id ("org/name")."""
    return bool(model) and (model.startswith(("/", ".", "~")) or os.path.exists(model))


def absolute_if_local(model: str) -> str:
    """A local model folder as an absolute path; a hub id ("org/name") or "" unchanged.

    Ray Train workers do not run in the driver's working directory: a relative path such as
    `data/tiny/models/student-…` (the demo's default data root) is not found there.
    """
    return os.path.abspath(os.path.expanduser(model)) if is_local_model(model) else model


def load_recipe(path: str, overrides: list[str], stages: dict) -> Recipe:
    """The recipe at `path` with `overrides`, for the pipeline `stages` (the CLI passes
    stages.STAGES; the core itself imports no stage)."""
    text = read_text(path, "recipe")  # a UTF-8 BOM / CRLF (a Windows editor) is fine
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)  # syntax errors carry one; others do not
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        why = " ".join(str(getattr(e, "problem", None) or e).split())
        raise UserError(f"recipe {path}: {where}not valid YAML ({why})") from None
    if not isinstance(raw, dict):
        raise UserError(f"recipe {path}: expected a mapping at the top level")
    valid = set(TOP_LEVEL) | set(stages)
    for key in raw:
        if key not in valid:
            raise UserError(f"recipe {path}: unknown key '{key}'{_nearest(key, valid)}")

    # The stages a recipe runs are its `stages` list, else the sections the recipe file has:
    # read before the overrides, which create a section to set a key in (`attribution.alpha=0.2`
    # tunes attribution; it does not add it to `run all`). `stages=[...]` still chooses.
    sections = [s for s in stages if s in raw]
    if os.environ.get("DISTILLERY_DATA_ROOT"):
        raw["data_root"] = os.environ["DISTILLERY_DATA_ROOT"]
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] not in valid:
            raise UserError(f"override '{text}': unknown key '{keys[0]}'{_nearest(keys[0], valid)}")
        if keys[0] in stages and len(keys) != 2:
            raise UserError(f"override '{text}': expected {keys[0]}.<key>=value")
        if keys[0] in stages and not isinstance(raw.get(keys[0]) or {}, dict):
            raise UserError(f"recipe {path}: section '{keys[0]}' must be a mapping")
        _set(raw, keys, value)

    if not raw.get("data_root"):
        raise UserError(f"recipe {path}: no data_root (set it in the recipe, "
                        "with DISTILLERY_DATA_ROOT, or data_root=...)")
    names = raw.get("stages") or sections
    if not isinstance(names, list):
        raise UserError(f"recipe {path}: 'stages' must be a list of stage names")
    for name in names:
        if name not in stages:
            raise UserError(f"recipe {path}: stages: unknown stage '{name}'{_nearest(name, stages)}")
    order = list(stages)
    names = sorted(names, key=order.index)

    teacher = absolute_if_local(str(raw.get("teacher") or ""))
    student = absolute_if_local(str(raw.get("student") or ""))
    configs = {}
    for name, stage in stages.items():
        section = dict(raw.get(name) or {})
        field_names = {f.name for f in dataclasses.fields(stage.config)}
        # The recipe's teacher / student / reasoning_tags fill every stage field of that name
        # the section leaves unset: one setting for every stage that splits reasoning.
        for role, value in (("teacher", teacher), ("student", student),
                            ("reasoning_tags", str(raw.get("reasoning_tags") or ""))):
            if role in field_names and role not in section and value:
                section[role] = value
            elif role != "reasoning_tags" and isinstance(section.get(role), str):
                section[role] = absolute_if_local(section[role])
        configs[name] = build_config(stage.config, section, f"recipe {path}: {name}")

    res_raw = raw.get("resources") or {}
    if not isinstance(res_raw, dict):
        raise UserError(f"recipe {path}: 'resources' must be a mapping of stage -> settings")
    resources = {}
    for name in stages:
        resources[name] = build_config(StageResources, res_raw.get(name) or {},
                                       f"recipe {path}: resources.{name}")
        scorers = resources[name].scorers
        other = sorted(set(scorers) - set(SCORER_FIELDS))
        if other:
            raise UserError(f"recipe {path}: resources.{name}.scorers: '{other[0]}' is not a "
                            f"scoring pool setting (one of {', '.join(SCORER_FIELDS)})")
        build_config(StageResources, scorers, f"recipe {path}: resources.{name}.scorers")
    for name in res_raw:
        if name not in stages:
            raise UserError(f"recipe {path}: resources: unknown stage '{name}'{_nearest(name, stages)}")
    data_root = str(raw["data_root"])
    if "://" not in data_root:
        data_root = os.path.abspath(os.path.expanduser(data_root))
    return Recipe(path=path, data_root=data_root, teacher=teacher, student=student,
                  stages=names, configs=configs, resources=resources, stage_defs=dict(stages))
