"""Method specs and parameters: `amg:spe,dup`, `--param amg.c3=50`, plan-file tables.

Unknown methods or parameters are one-line `UserError`s listing what exists.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any

from memaudit.common import UserError, user_number


def _registry() -> dict[str, Any]:
    from memaudit.guidance import REGISTRY

    return REGISTRY


def _cls(method: str) -> Any:
    reg = _registry()
    if method not in reg:
        raise UserError(f"unknown method {method!r}; known: {', '.join(sorted(reg))}")
    return reg[method]


def _field_types(method: str) -> dict[str, tuple[str, Any]]:
    cls = _cls(method)
    out = {}
    for f in fields(cls.Params):
        default = f.default if f.default is not MISSING else None
        out[f.name] = (str(f.type), default)
    return out


def coerce_value(method: str, key: str, value: Any) -> Any:
    """Convert `value` (a string from the command line, or a TOML value) to the field's type."""
    types = _field_types(method)
    if key not in types:
        raise UserError(f"unknown parameter {key!r} for method {method!r}; "
                        f"known: {', '.join(sorted(types)) or '(none)'}")
    ann, default = types[key]
    if not isinstance(value, str):
        if "float" in ann and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, float):
            user_number(value, f"parameter {method}.{key}")
        return value
    v = value.strip()
    if "None" in ann and v.lower() in ("none", "null", ""):
        return None
    try:
        if ann.startswith("bool") or isinstance(default, bool):
            if v.lower() in ("true", "1", "yes", "on"):
                return True
            if v.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(v)
        if ann.startswith("int") or (isinstance(default, int) and "float" not in ann):
            return int(v)
        if "float" in ann:
            return user_number(v, f"parameter {method}.{key}")
    except ValueError:
        raise UserError(f"parameter {method}.{key}: cannot read {value!r} as {ann}") from None
    return v


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """`"amg:spe,dup"` -> ("amg", {"parts": "spe,dup"}); `"dynamic"` -> ("dynamic", {})."""
    name, sep, arg = spec.strip().partition(":")
    cls = _cls(name)
    if not sep:
        return name, {}
    key = getattr(cls, "spec_param", None)
    if key is None:
        raise UserError(f"method {name!r} takes no ':' argument (got {spec!r})")
    return name, {key: coerce_value(name, key, arg)}


def parse_params(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """`["amg.c3=50", "dynamic.min_step=10"]` -> {"amg": {"c3": 50.0}, "dynamic": {...}}."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        lhs, eq, value = item.partition("=")
        method, dot, key = lhs.strip().rpartition(".")
        if not eq or not dot or not method or not key:
            raise UserError(f"bad --param {item!r}; expected METHOD.NAME=VALUE, e.g. amg.c3=50")
        out.setdefault(method, {})[key] = coerce_value(method, key, value)
    return out


def params_from_table(table: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """A plan file's `[params.METHOD]` tables, validated and typed like `parse_params`."""
    out: dict[str, dict[str, Any]] = {}
    for method, kv in (table or {}).items():
        if not isinstance(kv, dict):
            raise UserError(f"params.{method} must be a table of NAME = VALUE")
        out[method] = {k: coerce_value(method, k, v) for k, v in kv.items()}
    return out


def build_guidance(spec: str, params: dict[str, dict[str, Any]] | None = None) -> Any:
    """Instantiate a guidance from a spec and the parsed parameters of all methods."""
    from memaudit.guidance import make_guidance

    name, kw = parse_method_spec(spec)
    kw = {**(params or {}).get(name, {}), **kw}
    g = make_guidance(name, **kw)
    if hasattr(g, "bind_params"):  # composite methods (auto) build their parts with the run's
        g.bind_params(params or {})  # parameters of those methods
    return g
