"""Building a :class:`JobConfig`: preset → TOML file → ``--set section.key=value`` overrides.

* ``load_config(preset, path, overrides)`` resolves the three layers in that order; every value is checked
  against the field's type (``model.num_layers expects an integer, got 'four'``) and unknown sections or keys
  get a did-you-mean.
* ``to_toml(job)`` / ``job_to_dict`` / ``job_from_dict`` round-trip a resolved config; the trainer saves it as
  ``config.toml`` in the run folder and ``--resume`` reads it back. TOML has no null, so an unset (None)
  optional field is written as the string ``"none"``, which every optional field reads back as unset.
* ``describe_config()`` renders every section and field, with its docstring and default, from the dataclasses
  themselves: it is the README's configuration reference and ``zo2 train --help-config``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import math
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from zo2.config.base import did_you_mean
from zo2.config.job import JobConfig
from zo2.errors import ConfigError

NONE_STRINGS = ("none", "null")
"""Strings an optional field reads as unset (TOML has no null)."""


# ----------------------------------------------------------------------------------------------------------
# Schema: sections, fields, types and docstrings, all read off the dataclasses
# ----------------------------------------------------------------------------------------------------------

def sections() -> dict[str, type]:
    """``{section name: dataclass}`` in the order of :class:`JobConfig`'s fields."""
    hints = typing.get_type_hints(JobConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(JobConfig) if dataclasses.is_dataclass(hints[f.name])}


@functools.lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, Any]:
    """``{field: resolved type hint}`` of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the string literal under each field in the class body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def field_default(f: dataclasses.Field) -> Any:
    """The default value of a dataclass field (calling its factory)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


# ----------------------------------------------------------------------------------------------------------
# Type checking and coercion of raw (TOML or command-line) values
# ----------------------------------------------------------------------------------------------------------

def type_name(hint: Any) -> str:
    """A readable name for a type hint: 'integer', 'number', 'list of strings', 'integer or none'."""
    names = {int: "integer", float: "number", str: "string", bool: "boolean"}
    if hint in names:
        return names[hint]
    args = typing.get_args(hint)
    if _is_union(hint):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names + (["none"] if _is_optional(hint) else []))
    if typing.get_origin(hint) in (list, tuple):
        return f"list of {type_name(args[0])}s" if args else "list"
    return getattr(hint, "__name__", str(hint))


def _is_optional(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    return origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def coerce(where: str, hint: Any, value: Any) -> Any:
    """``value`` checked against ``hint`` (ints widen to floats; 'none' unsets an optional field)."""
    if _is_optional(hint) and (value is None or (isinstance(value, str) and value.strip().lower() in NONE_STRINGS)):
        return None
    if _is_union(hint):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        for member in members:
            try:
                return coerce(where, member, value)
            except ConfigError:
                continue
        raise _mismatch(where, hint, value)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    if typing.get_origin(hint) in (list, tuple) and isinstance(value, (list, tuple)):
        item = typing.get_args(hint)[0] if typing.get_args(hint) else Any
        items = [v if item is Any else coerce(f"{where}[{i}]", item, v) for i, v in enumerate(value)]
        return list(items)
    raise _mismatch(where, hint, value)


def _mismatch(where: str, hint: Any, value: Any) -> ConfigError:
    return ConfigError(f"Config key {where} expects {_article(type_name(hint))}, got {value!r} "
                       f"({_value_kind(value)}). Write it as a TOML value, e.g. {_example(hint)}.")


def _article(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _value_kind(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a table"}
    return kinds.get(type(value), type(value).__name__)


def _example(hint: Any) -> str:
    if _is_union(hint):
        members = [_example(a) for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(members) + (" (or none to unset it)" if _is_optional(hint) else "")
    examples = {int: "4", float: "0.001", str: '"text"', bool: "true"}
    if hint in examples:
        return examples[hint]
    return '["a", "b"]' if typing.get_origin(hint) in (list, tuple) else "a value of that type"


def parse_value(raw: str) -> Any:
    """A command-line value as a TOML literal (``4``, ``1e-3``, ``true``, ``[1, 2]``, ``"x"``), else the string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


# ----------------------------------------------------------------------------------------------------------
# Layers: dicts merged into the job's dict, with unknown names caught
# ----------------------------------------------------------------------------------------------------------

def _unknown_section(name: str, source: str) -> ConfigError:
    known = list(sections())
    return ConfigError(f"Unknown config section [{name}] in {source}.{did_you_mean(name, known)} "
                       f"The sections are: {', '.join(known)} (see `zo2 train --help-config`).")


def _unknown_key(section: str, key: str, source: str) -> ConfigError:
    cls = sections()[section]
    hint = did_you_mean(key, field_types(cls))
    elsewhere = [s for s, c in sections().items() if s != section and key in field_types(c)]
    if elsewhere:
        hint += f" '{key}' is a key of [{elsewhere[0]}]: {elsewhere[0]}.{key}."
    return ConfigError(f"Unknown config key {section}.{key} in {source}.{hint} The keys of [{section}] are: "
                       f"{', '.join(field_types(cls))} (see `zo2 train --help-config`).")


def merge_layer(base: dict[str, Any], layer: Mapping[str, Any], source: str) -> None:
    """Merge a ``{section: {key: value}}`` layer (plus an optional top-level ``preset``) into ``base``."""
    for name, table in layer.items():
        if name == "preset":
            base["preset"] = coerce("preset", str, table)
            continue
        if name not in sections():
            raise _unknown_section(name, source)
        if not isinstance(table, Mapping):
            raise ConfigError(f"Config section [{name}] in {source} must be a table of key = value lines, "
                              f"got {table!r}.")
        types_ = field_types(sections()[name])
        for key, value in table.items():
            if key not in types_:
                raise _unknown_key(name, key, source)
            base[name][key] = coerce(f"{name}.{key}", types_[key], value)


def parse_override(item: str) -> tuple[str, str, str]:
    """``'section.key=value'`` → ``(section, key, raw value text)``."""
    if "=" not in item:
        raise ConfigError(f"Override {item!r} has no '='. Write it as --set section.key=value, "
                          "e.g. --set optim.lr=1e-3.")
    dotted, raw = item.split("=", 1)
    dotted = dotted.strip()
    if dotted.count(".") != 1 or not all(dotted.split(".")):
        raise ConfigError(f"Override key {dotted!r} must be section.key, e.g. --set optim.lr=1e-3 or "
                          "--set train.steps=100.")
    section, key = dotted.split(".")
    return section, key, raw.strip()


def _accepts_str(section: str, key: str) -> bool:
    cls = sections().get(section)
    hint = field_types(cls).get(key) if cls is not None else None
    return hint is str or (_is_optional(hint) and str in typing.get_args(hint))


def apply_overrides(base: dict[str, Any], overrides: Iterable[str]) -> None:
    """Apply ``--set section.key=value`` overrides, in order, to the job's dict. A string field takes the
    text as written even when it reads as another TOML type (``--set model.path=2024`` is the folder '2024')."""
    for item in overrides:
        section, key, raw = parse_override(item)
        value = parse_value(raw)
        if _accepts_str(section, key) and not isinstance(value, str):
            value = raw
        merge_layer(base, {section: {key: value}}, f"--set {item}")


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML config file as a dict; ConfigError when missing or malformed."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"Config file {str(p)!r} does not exist. Pass an existing TOML file to --config "
                          "(`zo2 train --help-config` lists every key).")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Config file {str(p)!r} is not valid TOML: {exc}. Fix the line it names.") from exc


# ----------------------------------------------------------------------------------------------------------
# Dict round trip
# ----------------------------------------------------------------------------------------------------------

def job_to_dict(job: JobConfig) -> dict[str, Any]:
    """``{"preset": name, section: {key: value}}`` of a job (values as stored; None stays None)."""
    out: dict[str, Any] = {"preset": job.preset}
    for name in sections():
        section = getattr(job, name)
        out[name] = {f.name: _plain(getattr(section, f.name)) for f in dataclasses.fields(section)}
    return out


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def job_from_dict(d: Mapping[str, Any]) -> JobConfig:
    """A validated JobConfig from a complete or partial dict (missing keys take the dataclass defaults)."""
    base = {name: {} for name in sections()}
    base["preset"] = JobConfig().preset if "preset" not in d else d["preset"]
    merge_layer(base, d, "the config")
    return build_job(base)


def build_job(d: Mapping[str, Any]) -> JobConfig:
    """Construct (and so validate) every section, then the job. Fills optim.total_steps from train.steps."""
    optim = dict(d["optim"])
    if optim.get("total_steps") is None and optim.get("lr_schedule", "constant") != "constant":
        optim["total_steps"] = d["train"].get("steps", field_default(_field(sections()["train"], "steps")))
    built = {name: cls(**(optim if name == "optim" else d[name])) for name, cls in sections().items()}
    return JobConfig(preset=d.get("preset", JobConfig().preset), **built)


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


# ----------------------------------------------------------------------------------------------------------
# The three layers
# ----------------------------------------------------------------------------------------------------------

def load_config(preset: str | None = None, path: str | Path | None = None,
                overrides: Iterable[str] = ()) -> JobConfig:
    """The job: ``preset`` (else the file's top-level ``preset``, else tiny-opt), the TOML file at ``path``
    merged on top, then the ``section.key=value`` overrides."""
    from zo2.config.presets import get_preset

    layer = read_toml(path) if path is not None else {}
    name = preset or layer.get("preset") or "tiny-opt"
    base = job_to_dict(get_preset(str(name)))
    if path is not None:
        merge_layer(base, layer, str(path))
    apply_overrides(base, overrides)
    base["preset"] = str(name)
    return build_job(base)


def load_saved_config(path: str | Path, overrides: Iterable[str] = ()) -> JobConfig:
    """A resolved config written by :func:`to_toml` (a run folder's config.toml), with overrides on top."""
    base = {name: {} for name in sections()}
    layer = read_toml(path)
    base["preset"] = layer.get("preset", JobConfig().preset)
    merge_layer(base, layer, str(path))
    apply_overrides(base, overrides)
    return build_job(base)


# ----------------------------------------------------------------------------------------------------------
# Writing TOML and the reference
# ----------------------------------------------------------------------------------------------------------

def toml_value(value: Any) -> str:
    """A Python value as a TOML literal (None as "none")."""
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(job: JobConfig, comments: bool = False) -> str:
    """The resolved job as TOML (``comments``: each field's docstring above it)."""
    lines = [f"preset = {toml_value(job.preset)}"]
    for name, cls in sections().items():
        lines += ["", f"[{name}]"]
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if comments and f.name in docs:
                lines += [f"# {line}".rstrip() for line in docs[f.name].splitlines()]
            lines.append(f"{f.name} = {toml_value(_plain(getattr(getattr(job, name), f.name)))}")
    return "\n".join(lines) + "\n"


def describe_config() -> str:
    """Markdown reference of every section and field: type, default and docstring."""
    out = [
        "A job is resolved in three layers: a preset (`--preset`, default `tiny-opt`), a TOML file "
        "(`--config`, may name its own top-level `preset = \"...\"`), then `--set section.key=value` "
        "overrides (values are TOML literals: `4`, `1e-3`, `true`, `\"text\"`; bare words are strings; "
        "`none` unsets an optional field). The defaults below are the dataclass defaults; presets change the "
        "model shape and tune `[optim]` and `[train]` (`zo2 train --list-presets`). The resolved config is "
        "saved as `config.toml` in the run folder.",
    ]
    for name, cls in sections().items():
        out += ["", f"### `[{name}]`", "", inspect.cleandoc(cls.__doc__ or ""), ""]
        docs, hints = field_docs(cls), field_types(cls)
        for f in dataclasses.fields(cls):
            value = field_default(f)
            default = "unset" if value is None else f"`{toml_value(_plain(value))}`"
            doc = " ".join(docs.get(f.name, "").split())
            out.append(f"- `{name}.{f.name}` ({type_name(hints[f.name])}, default {default}): {doc}")
    return "\n".join(out) + "\n"


REFERENCE_HEADING = "## Configuration reference"


def write_reference(readme: str | Path) -> None:
    """Replace the README's ``## Configuration reference`` section (up to the next ``## `` heading or the end)
    with :func:`describe_config`'s text, appending the section when there is none."""
    p = Path(readme)
    text = p.read_text(encoding="utf-8")
    section = f"{REFERENCE_HEADING}\n\n{describe_config()}"
    if REFERENCE_HEADING not in text:
        p.write_text(text.rstrip("\n") + "\n\n" + section, encoding="utf-8")
        return
    head, rest = text.split(REFERENCE_HEADING, 1)
    cut = rest.find("\n## ")
    tail = rest[cut + 1:] if cut >= 0 else ""
    p.write_text(head + section + ("\n" + tail if tail else ""), encoding="utf-8")
