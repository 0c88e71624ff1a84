"""Pipelines as text (``fold-constants,svd{energy=0.9}``) or TOML recipes, resolved to passes.

Everything here runs before the model is loaded, so an unknown pass or a bad option is
reported without touching any file.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from onnxpress.core.errors import PipelineError, PluginError
from onnxpress.core.options import build_options, parse_option_text, split_top_level
from onnxpress.core.pass_base import Pass
from onnxpress.core.registry import get_pass

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")

# Lossless for a float model; on a QDQ model (from any quantizer) fix-saturation also makes its
# int8 weights safe on the targets whose kernels saturate int16 pairs (it refuses otherwise).
DEFAULT_LOSSLESS = (
    "fold-constants,fold-batchnorm,fuse-lstm,fuse-gru,cleanup,fix-saturation,toposort"
)
# With calibration data the default adds post-training int8 quantization (the one lossy
# step that needs no accuracy trade-off chosen by the user); the lossless clean-ups run first,
# after a float16 model is made to compute in float32 (int8 QDQ takes float32 activations
# below opset 19; its interface stays float16; no change to a float32 model).
DEFAULT_WITH_CALIBRATION = (
    "upcast-float16,fold-constants,fold-batchnorm,fuse-lstm,fuse-gru,cleanup,qdq,toposort"
)


@dataclass
class VerifySettings:
    """Recipe-level verification settings ([verify] table)."""

    level: str | None = None
    metric: str | None = None
    budget: float | None = None
    tolerance: float | None = None
    holdout: int | None = None


@dataclass
class Recipe:
    passes: list[Pass[Any]]
    verify: VerifySettings = field(default_factory=VerifySettings)
    calibration: str | None = None


def _instantiate(name: str, values: dict[str, Any]) -> Pass[Any]:
    try:
        cls = get_pass(name)
    except PluginError as exc:
        raise PipelineError(str(exc)) from None
    options = build_options(name, cls.options_type, values)
    return cls(options)


def parse_pipeline(text: str) -> list[Pass[Any]]:
    """Parse ``a,b{k=v},c`` into pass instances with validated options."""
    if not text or not text.strip():
        raise PipelineError("empty pipeline")
    passes: list[Pass[Any]] = []
    for item in split_top_level(text.strip()):
        if not item:
            raise PipelineError(f"empty pass name in pipeline {text!r}")
        name, brace, rest = item.partition("{")
        name = name.strip()
        values: dict[str, Any] = {}
        if brace:
            if not rest.endswith("}"):
                raise PipelineError(f"pass '{name}': options must end with '}}' in {item!r}")
            values = parse_option_text(name, rest[:-1])
        passes.append(_instantiate(name, values))
    return passes


def format_pipeline(passes: list[Pass[Any]]) -> str:
    return ",".join(p.spec() for p in passes)


def load_recipe(path: str | Path) -> Recipe:
    """Read a TOML recipe::

        [verify]
        level = "numeric"
        metric = "rel-l2"
        budget = 0.02

        [[pass]]
        name = "svd"
        energy = 0.95

    ``pipeline = "a,b{k=v}"`` may replace the [[pass]] tables. Every value is checked for
    its type here, before the model is read; errors name the recipe file.
    """
    file = Path(path)
    try:
        return _parse_recipe(file)
    except PipelineError as exc:
        message = str(exc)
        raise PipelineError(
            message if message.startswith(str(file)) else f"{file}: {message}"
        ) from None


def _parse_recipe(file: Path) -> Recipe:
    if file.is_dir():
        raise PipelineError(f"{file}: the recipe is a folder, not a TOML file")
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{file}: recipe not found") from None
    except OSError as exc:
        raise PipelineError(f"{file}: cannot read the recipe: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{file}: not valid TOML: {exc}") from None
    unknown = set(data) - {"pass", "pipeline", "verify", "calibration"}
    if unknown:
        raise PipelineError(f"{file}: unknown recipe keys {sorted(unknown)}")
    if "pass" in data and "pipeline" in data:
        raise PipelineError(f"{file}: give either [[pass]] tables or 'pipeline', not both")
    passes: list[Pass[Any]] = []
    if "pipeline" in data:
        passes = parse_pipeline(_typed(file, "pipeline", data["pipeline"], str) or "")
    else:
        tables = data.get("pass", [])
        if not isinstance(tables, list) or not tables:
            raise PipelineError(f"{file}: no [[pass]] tables")
        for i, table in enumerate(tables):
            if not isinstance(table, dict) or not isinstance(table.get("name"), str):
                raise PipelineError(f"{file}: [[pass]] #{i + 1} has no name")
            values = {k: v for k, v in table.items() if k != "name"}
            passes.append(_instantiate(table["name"], values))
    verify = data.get("verify", {})
    keys = {"level", "metric", "budget", "tolerance", "holdout"}
    if not isinstance(verify, dict) or set(verify) - keys:
        raise PipelineError(
            f"{file}: [verify] accepts level, metric, budget, tolerance and holdout"
        )
    settings = VerifySettings(
        level=_typed(file, "verify.level", verify.get("level"), str),
        metric=_typed(file, "verify.metric", verify.get("metric"), str),
        budget=_number(file, "verify.budget", verify.get("budget")),
        tolerance=_number(file, "verify.tolerance", verify.get("tolerance")),
        holdout=_typed(file, "verify.holdout", verify.get("holdout"), int),
    )
    if settings.level is not None and settings.level not in ("off", "structure", "numeric"):
        raise PipelineError(
            f"{file}: verify.level must be off, structure or numeric, not {settings.level!r}"
        )
    from onnxpress.core.verify import METRICS

    if settings.metric is not None and settings.metric not in METRICS:
        raise PipelineError(
            f"{file}: unknown verify.metric '{settings.metric}' (metrics: {', '.join(METRICS)})"
        )
    calibration = _typed(file, "calibration", data.get("calibration"), str)
    if calibration is not None:
        calibration = str((file.parent / calibration).resolve())
    return Recipe(passes=passes, verify=settings, calibration=calibration)


def _typed(file: Path, key: str, value: Any, kind: type[T]) -> T | None:
    """``value`` if it is a ``kind`` (bool is not an int), None if absent."""
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        name = {str: "text", int: "an integer"}.get(kind, kind.__name__)
        raise PipelineError(f"{file}: {key} must be {name}, not {value!r}")
    return value


def _number(file: Path, key: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PipelineError(f"{file}: {key} must be a finite number, not {value!r}")
    return float(value)
