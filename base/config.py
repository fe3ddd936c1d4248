"""Config I/O for any schema: YAML file(s) → typed schema, with `a.b=value` overrides from the
command line. Unknown keys, wrong types and out-of-range values are UserErrors that name the key
and where it came from (the file or the command line). The schema itself is composed by the
stages (torchtitan-style: each owns its section; trainer/run_config.py joins them).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from base.errors import UserError

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Config base: unknown keys are errors, values are validated on assignment too, and inf or
    nan is never a valid number (lr=inf would otherwise train to the end and report nan)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def parse_override(text: str) -> tuple[list[str], Any]:
    key, eq, value = text.partition("=")
    if not eq or not key or any(not part for part in key.split(".")):
        raise UserError(f"override {text!r}: expected KEY=VALUE with a dotted key, e.g. data.shard.seed=3")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value  # plain string
    return key.split("."), parsed


def apply_override(raw: dict, path: list[str], value: Any, text: str) -> None:
    node = raw
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"override {text!r}: {'.'.join(path[:i + 1])} is a value, not a section")
        node = child
    node[path[-1]] = value


def _known_fields(schema: type[BaseModel], loc: tuple) -> list[str]:
    model: type[BaseModel] | None = schema
    for part in loc:
        field = model.model_fields.get(str(part)) if model else None
        ann = field.annotation if field else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return list(model.model_fields) if model else []


def explain(err: ValidationError, origin_of, schema: type[BaseModel]) -> str:
    """One line per validation error, naming the key, where it came from, and a close known key."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        where = origin_of(key)
        if e["type"] == "extra_forbidden":
            known = _known_fields(schema, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f" (did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?)" if close else \
                f" (known keys here: {', '.join(known)})" if known else ""
            lines.append(f"{where}: unknown config key {key!r}{hint}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {key}: {msg} (got {e['input']!r})")
    return "; ".join(lines)


def load(schema: type[M], path: Path | None, overrides: list[str] = ()) -> M:
    """`schema`'s defaults, then the YAML file (if any), then the overrides, validated together."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        if not path.is_file():
            raise UserError(f"config file {path}: not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"{path}{at}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path}: the top level must be a mapping of sections, not {type(raw).__name__}")
    overridden: dict[str, str] = {}
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(raw, keys, value, text)
        overridden[".".join(keys)] = text

    def origin_of(key: str) -> str:
        hit = next((t for k, t in overridden.items() if key == k or key.startswith(k + ".")), None)
        return f"command-line override {hit!r}" if hit else source

    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        raise UserError(explain(e, origin_of, schema)) from None


def save_yaml(data: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def resolved(cfg: BaseModel) -> dict:
    return cfg.model_dump(mode="json")
