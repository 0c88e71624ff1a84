"""The pass contract: a class with one frozen options dataclass that rewrites a gs.Graph in place.

A pass never prints and never verifies its own output; the pass manager does both. It
returns a PassResult that says what it changed and, for each candidate it left alone, why.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from onnxpress.core.context import PassContext


@dataclass(frozen=True)
class NoOptions:
    """Options of a pass that takes none."""


OptionsT = TypeVar("OptionsT")


@dataclass
class Refusal:
    """A candidate the pass looked at and left unchanged, with the reason."""

    node: str
    reason: str


@dataclass
class PassResult:
    """What one pass changed.

    ``counts`` holds named counters (e.g. ``{"folded": 3}``); ``details`` holds per-node
    records (e.g. one per factored layer); ``refusals`` says why candidates were skipped.
    The pass manager adds params, MACs, bytes and timing around this.
    """

    counts: dict[str, int] = field(default_factory=dict)
    refusals: list[Refusal] = field(default_factory=list)
    details: list[dict[str, Any]] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(v for v in self.counts.values())

    def count(self, key: str, amount: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + amount

    def refuse(self, node: str, reason: str) -> None:
        self.refusals.append(Refusal(node, reason))

    def to_json(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts),
            "refusals": [dataclasses.asdict(r) for r in self.refusals],
            "details": list(self.details),
        }


class Pass(Generic[OptionsT]):
    """Base class of every pass, built-in or user-supplied.

    Subclasses set:
      * ``options_type``: a frozen dataclass whose fields are the pass's options;
      * ``lossless``: True when the rewrite preserves outputs up to float rounding;
      * ``metric``/``default_budget``: for lossy passes, how the verifier judges the output
        against the original model (see ``onnxpress.core.verify.METRICS``);
      * ``preserves``: analysis classes whose cached results remain valid after the pass;
      * ``runs_optimized``: a lossless pass exact only as users run the model (onnxruntime's
        graph optimizations on): it and every pass after it are verified that way;
      * ``exact_int8``: a lossy pass that computes onnxruntime's integer kernels with exact
        sums: where this CPU's default kernels saturate int16 pairs, it is judged against
        onnxruntime's exact kernels (``core.emulated_runner.exact_int8_runner``);
    and implement ``run``. The first line of the class docstring is the pass description.
    """

    name: ClassVar[str] = ""
    options_type: ClassVar[type] = NoOptions
    lossless: ClassVar[bool] = True
    metric: ClassVar[str] = "rel-l2"
    default_budget: ClassVar[float | None] = 0.05  # None: the metric's own (task)
    recovery_hint: ClassVar[str] = ""  # what to try when the result misses its budget
    preserves: ClassVar[tuple[type, ...]] = ()
    runs_optimized: ClassVar[bool] = False
    exact_int8: ClassVar[bool] = False

    def __init__(self, options: OptionsT | None = None) -> None:
        self.options: OptionsT = options if options is not None else self.options_type()

    @classmethod
    def description(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0].strip() if doc else ""

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError(f"pass '{self.name}' does not implement run()")

    def spec(self) -> str:
        """The pipeline text that recreates this pass with its options."""
        from onnxpress.core.options import format_options

        text = format_options(self.options)
        return f"{self.name}{{{text}}}" if text else self.name
