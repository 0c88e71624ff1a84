"""Parse pass options from text (``svd{energy=0.95,include=[fc1,fc2]}``) or TOML values.

Options are fields of a frozen dataclass. Text values are converted to the field's declared
type (int, float, bool, str, Literal choices, tuples of those, optional values); TOML values
are checked against the same types. Keys may be written kebab-case or snake_case.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from onnxpress.core.errors import PipelineError

_INT64 = 2**63
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside quotes, braces and brackets."""
    parts: list[str] = []
    depth = 0
    quote = ""
    current: list[str] = []
    for ch in text:
        if quote:
            current.append(ch)
            if ch == quote:
                quote = ""
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "{[(":
            depth += 1
        elif ch in "}])":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"unbalanced '{ch}' in {text!r}")
        elif ch == sep and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    if quote:
        raise PipelineError(f"unterminated quote in {text!r}")
    if depth != 0:
        raise PipelineError(f"unbalanced brackets in {text!r}")
    parts.append("".join(current).strip())
    return parts


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is tuple:
        return f"list of {_describe(get_args(tp)[0])}"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any) -> Any:
    """Convert a text or TOML value to ``tp``; raise ValueError with a reason."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if type(None) in args and (
            value is None or (isinstance(value, str) and value in {"none", "None", ""})
        ):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(f"expected {_describe(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        text = _unquote(value) if isinstance(value, str) else value
        if text in choices:
            return text
        raise ValueError(f"expected one of {', '.join(map(str, choices))}, got {value!r}")
    if origin is tuple:
        elem = get_args(tp)[0]
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("[") and text.endswith("]"):
                text = text[1:-1]
            items: list[Any] = [p for p in split_top_level(text) if p] if text else []
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [value]
        return tuple(_convert(item, elem) for item in items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"expected int, got {value!r}")
        number: int | None = value if isinstance(value, int) else None
        if isinstance(value, str):
            try:
                number = int(value)
            except ValueError:
                pass
        if number is None:
            raise ValueError(f"expected int, got {value!r}")
        if not -_INT64 <= number < _INT64:
            raise ValueError(f"expected an int64, got {value!r}")
        return number
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"expected float, got {value!r}")
        real: float | None = None
        try:
            if isinstance(value, (int, float, str)):
                real = float(value)
        except (ValueError, OverflowError):
            pass
        if real is None:
            raise ValueError(f"expected float, got {value!r}")
        if not math.isfinite(real):
            raise ValueError(f"expected a finite float, got {value!r}")
        return real
    if tp is str:
        if isinstance(value, str):
            return _unquote(value)
        raise ValueError(f"expected text, got {value!r}")
    raise ValueError(f"unsupported option type {tp!r}")


def option_fields(options_type: type) -> list[tuple[str, Any, Any]]:
    """(kebab-case name, type, default) for each field of an options dataclass."""
    hints = typing.get_type_hints(options_type)
    out = []
    for f in dataclasses.fields(options_type):
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        out.append((f.name.replace("_", "-"), hints[f.name], default))
    return out


def describe_type(tp: Any) -> str:
    return _describe(tp)


def build_options(pass_name: str, options_type: type, values: dict[str, Any]) -> Any:
    """Instantiate ``options_type`` from raw values, raising PipelineError with the pass name."""
    known = {name: tp for name, tp, _ in option_fields(options_type)}
    kwargs: dict[str, Any] = {}
    for raw_key, raw_value in values.items():
        key = raw_key.strip().replace("_", "-")
        if key not in known:
            valid = ", ".join(sorted(known)) or "none"
            raise PipelineError(
                f"pass '{pass_name}': unknown option '{raw_key}' (options: {valid})"
            )
        try:
            kwargs[key.replace("-", "_")] = _convert(raw_value, known[key])
        except ValueError as exc:
            raise PipelineError(f"pass '{pass_name}': option '{key}': {exc}") from None
    try:
        return options_type(**kwargs)
    except (ValueError, TypeError) as exc:
        raise PipelineError(f"pass '{pass_name}': {exc}") from None


def parse_option_text(pass_name: str, text: str) -> dict[str, str]:
    """``energy=0.95,include=[a,b]`` -> {"energy": "0.95", "include": "[a,b]"}."""
    values: dict[str, str] = {}
    for item in split_top_level(text):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PipelineError(f"pass '{pass_name}': option '{item}' is not key=value")
        if key.strip() in values:
            raise PipelineError(f"pass '{pass_name}': option '{key.strip()}' given twice")
        values[key.strip()] = value.strip()
    return values


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    if isinstance(value, str) and any(c in value for c in ",{}[]=\"' "):
        return '"' + value + '"'
    return str(value)


def format_options(options: Any) -> str:
    """Text for the options that differ from their defaults, for logs and replay."""
    if not dataclasses.is_dataclass(options):
        return ""
    parts = []
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (
                f.default_factory()
                if f.default_factory is not dataclasses.MISSING
                else dataclasses.MISSING
            )
        )
        if value != default:
            parts.append(f"{f.name.replace('_', '-')}={_format_value(value)}")
    return ",".join(parts)
