"""ConfigError, and validation that says pydantic's errors in params terms: the field, the problem, the fix.

Example::

    validate(Resources, {"nodes": 0}, loc=("launcher", "resources"))
    # ConfigError: params: launcher.resources.nodes: must be >= 1, got 0. Fix: set launcher.resources.nodes >= 1.
"""

import dataclasses
import functools
from typing import Any

from pydantic import TypeAdapter, ValidationError


class ConfigError(ValueError):
    """Bad configuration: names the field, what is wrong with it, and how to fix it."""

    def __init__(self, problems: list[tuple[str, str, str]], source: str = "params"):
        self.problems = problems
        self.source = source
        lines = [f"{source}: {f}: {p}. Fix: {fix}." for f, p, fix in problems]
        super().__init__("\n".join(lines))


@functools.cache
def _adapter(cls) -> TypeAdapter:
    return TypeAdapter(cls)


def validate(cls, raw: Any, loc: tuple = (), source: str = "params"):
    """``raw`` (a params tree) as a ``cls``; every problem in one ConfigError, fields named from ``loc`` on."""
    try:
        return _adapter(cls).validate_python(raw)
    except ValidationError as e:
        raise ConfigError([p for err in e.errors() for p in problems(cls, err, loc)], source) from None


def dotted(loc: tuple) -> str:
    """('ddo', 'sweep_beta', 1) -> 'ddo.sweep_beta[1]'."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


# pydantic's error types as (problem, fix); {path} is the field, {v} its value, the rest is worked out below.
SAY = {
    "missing": ("is missing", "add '{name}:' under '{parent}' (see `repro params --preset tiny` for a complete file)"),
    "unexpected_keyword_argument": ("unknown key", "remove it, or use one of: {fields}"),
    "dataclass_type": ("must be a mapping of {class_name} fields, got {v!r}",
                       "write '{path}:' followed by its indented keys"),
    "mapping": ("must be a mapping of names to values, got {v!r}",
                "write '{path}:' followed by indented 'name: value' lines, or {{}}"),
    "tuple_type": ("must be a list of {item}, got {v!r}", "write it as [a, b, ...]"),
    "literal_error": ("must be one of {choices}; got {v!r}", "set {path} to one of {choices}"),
    "int_type": ("must be an integer, got {v!r}", "write a whole number such as 128"),
    "float_type": ("must be a number, got {v!r}", "write a number such as 0.05"),
    "bool_type": ("must be true or false, got {v!r}", "write true or false"),
    "string_type": ("must be a string, got {v!r}", "quote it"),
    "nan": ("is NaN", "write a number"),
    **{kind: (f"must be {op} {{bound}}, got {{v!r}}", f"set {{path}} {op} {{bound}}") for kind, op in (
        ("greater_than", ">"), ("greater_than_equal", ">="), ("less_than", "<"), ("less_than_equal", "<="))},
}


def _declared(cls, loc: tuple):
    """The type declared at ``loc`` (dataclass fields, tuple items) below ``cls``."""
    for part in loc:
        cls = cls.__args__[0] if isinstance(part, int) else cls.__pydantic_fields__[part].annotation
    return cls


def problems(cls, err: dict, loc: tuple = ()) -> list[tuple[str, str, str]]:
    """One pydantic error (of validating a ``cls``) as (field, problem, fix), the field named from ``loc`` on."""
    kind, where, v, ctx = err["type"], err["loc"], err.get("input"), err.get("ctx") or {}
    if kind == "invalid_key":  # a key that is not a string is no field either
        kind, where = "unexpected_keyword_argument", (*where[:-1], str(v))
    path = dotted(loc + where)
    if isinstance(ctx.get("error"), ConfigError):  # a section's rules: fields relative to the section
        return [(".".join(filter(None, (path, f))), p, fix) for f, p, fix in ctx["error"].problems]
    if kind == "literal_error" and not isinstance(v, str):
        kind = "string_type"
    if kind not in SAY:
        return [(path or "(top level)", err["msg"], "see `repro params --preset tiny`")]
    bound = next((ctx[k] for k in ("gt", "ge", "lt", "le") if k in ctx), None)
    words = dict(path=path, v=v, class_name=ctx.get("class_name"), name=where[-1] if where else "",
                 parent=dotted(loc + where[:-1]) or "the top level",
                 bound=int(bound) if isinstance(bound, float) and bound.is_integer() else bound)  # gt=0 reads 0.0
    if kind == "unexpected_keyword_argument":
        words["fields"] = ", ".join(f.name for f in dataclasses.fields(_declared(cls, where[:-1])))
    elif kind == "literal_error":
        words["choices"] = ", ".join(map(str, _declared(cls, where).__args__))
    elif kind == "tuple_type":
        item = _declared(cls, where).__args__[0]
        words["item"] = getattr(item, "__origin__", item).__name__  # Annotated[int, ...] -> int
    problem, fix = SAY[kind]
    return [(path, problem.format(**words), fix.format(**words))]
