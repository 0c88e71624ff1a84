"""The optimization report: per pass its wall time, what it changed, model statistics before
and after, and the verification outcome. Rendered by the CLI; stored as JSON with --report."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxpress.core.pass_base import PassResult
from onnxpress.core.stats import ModelStats


@dataclass
class VerifyOutcome:
    level: str
    metric: str | None = None
    value: float | None = None
    limit: float | None = None
    output: str | None = None
    # target -> the same judgement under that target's emulated integer arithmetic
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    # this CPU's onnxruntime run of an int8 model where it was measured but not judged (its
    # int8 arithmetic is none of the targets'): target, metric, value, limit, output; the
    # value above is then the worst target's
    host_not_judged: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "host_not_judged": self.host_not_judged,
            "level": self.level,
            "metric": self.metric,
            "value": self.value,
            "limit": self.limit,
            "output": self.output,
            "targets": self.targets,
        }


@dataclass
class PassRecord:
    name: str
    spec: str
    lossless: bool
    seconds: float
    before: ModelStats
    after: ModelStats
    result: PassResult
    verification: VerifyOutcome

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "spec": self.spec,
            "lossless": self.lossless,
            "seconds": round(self.seconds, 6),
            "before": self.before.to_json(),
            "after": self.after.to_json(),
            **self.result.to_json(),
            "verification": self.verification.to_json(),
        }


@dataclass
class Report:
    pipeline: str
    before: ModelStats
    after: ModelStats
    passes: list[PassRecord] = field(default_factory=list)
    input_path: str | None = None
    output_path: str | None = None
    verify_level: str = "numeric"
    seconds: float = 0.0
    targets: list[str] = field(default_factory=list)  # the hardware the model was verified for

    def to_json(self) -> dict[str, Any]:
        return {
            "input": self.input_path,
            "output": self.output_path,
            "pipeline": self.pipeline,
            "verify": self.verify_level,
            "targets": self.targets,
            "seconds": round(self.seconds, 6),
            "before": self.before.to_json(),
            "after": self.after.to_json(),
            "passes": [p.to_json() for p in self.passes],
        }

    def write(self, path: str | Path) -> None:
        """Write the JSON report atomically."""
        target = Path(path)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        try:
            tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
