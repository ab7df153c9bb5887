"""Reading a YAML config file into a pydantic model, every error as one line naming the key.

`read_yaml_mapping` names the file, line and column of a YAML syntax error and refuses an
empty file or one whose top level is not a mapping. `validate` runs the model's validation
and turns pydantic's multi-line report into one line per error (joined by '; '): the dotted
key, the value given and the reason, and for an unknown key the nearest valid key (difflib)
or the valid keys of that section. Both raise ValueError only.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Optional, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)


def yaml_error_line(err: yaml.YAMLError, source: str, lines: bool = True) -> str:
    """'<source>:<line>:<column>: YAML syntax error: <problem>' (1-based, as editors count);
    lines=False: a one-line source (an override), named without line and column."""
    mark = getattr(err, "problem_mark", None)
    where = (f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None and lines
             else source)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and lines and start is not None and (mark is None or start.line != mark.line):
        problem += f" ({context} at line {start.line + 1}, column {start.column + 1})"
    elif context:
        problem += f" ({context})"
    return f"{where}: YAML syntax error: {problem}"


def read_yaml_mapping(path: str) -> dict:
    """The top-level mapping of a YAML file; ValueError (one line) when it is missing, empty,
    not YAML, or not a mapping."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"config file {path!r} does not exist")
    text = file.read_text()
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(yaml_error_line(err, path)) from None
    if tree is None:
        raise ValueError(f"config file {path!r} is empty (it holds no settings)")
    if not isinstance(tree, dict):
        raise ValueError(f"config file {path!r} must be a mapping of sections (section: "
                         f"{{key: value}}), not a {type(tree).__name__}")
    return tree


def _field_names(model: type[BaseModel], loc: tuple) -> Optional[list[str]]:
    """The field names of the (nested) model at `loc`, or None when `loc` is not a model."""
    for key in loc:
        field = model.model_fields.get(key) if isinstance(key, str) else None
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return list(model.model_fields)


def _dotted(loc: tuple) -> str:
    return ".".join(str(k) for k in loc)


def _value(value: Any) -> str:
    if isinstance(value, (dict, list)) or value is None:
        return ""
    return f"={value}"


def error_line(model: type[BaseModel], err: ValidationError) -> str:
    """pydantic's errors of `model` as one line."""
    parts = []
    for e in err.errors():
        msg, value = e["msg"], _value(e.get("input"))
        loc = tuple(k for k in e["loc"] if k != "[key]")  # a bad dict key: named by loc
        if len(loc) < len(e["loc"]):
            value = ""
        if e["type"] == "extra_forbidden":
            valid = _field_names(model, loc[:-1]) or []
            prefix = _dotted(loc[:-1]) + "." if len(loc) > 1 else ""
            near = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
            hint = (f"did you mean '{prefix}{near[0]}'?" if near else
                    f"valid keys{' of ' + _dotted(loc[:-1]) if prefix else ''}: "
                    + ", ".join(valid))
            parts.append(f"unknown key '{_dotted(loc)}'; {hint}")
            continue
        if e["type"] == "value_error":  # raised by our validators: the text names the keys
            msg = msg.removeprefix("Value error, ")
            parts.append(f"{_dotted(loc)}: {msg}" if loc else msg)
            continue
        parts.append(f"{_dotted(loc)}{value}: {msg}")
    return "; ".join(parts)


def validate(model: type[Model], tree: dict) -> Model:
    """`model.model_validate(tree)` with a one-line ValueError instead of pydantic's report."""
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        raise ValueError(error_line(model, err)) from None
