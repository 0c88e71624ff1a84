"""lower-einsum: the ONNX Einsum op -> Transpose / Reshape / MatMul / ReduceSum.

Each Einsum with static shapes is contracted two operands at a time, the pair whose result
is smallest first (a greedy order, as opt_einsum's): letters that only one operand holds and
the result does not keep are summed out first (ReduceSum); then for a pair, the letters both
hold and the result keeps are batch axes, the letters both hold and nothing else needs are
the contraction, and

    A: Transpose -> [batch, A's own, contracted] -> Reshape [B, M, K]
    B: Transpose -> [batch, contracted, B's own] -> Reshape [B, K, N]
    MatMul -> [B, M, N] -> Reshape [batch, A's own, B's own]

(2-D when there is no batch axis); a last Transpose puts the letters in the output's order.
The transposes of constant operands fold at compile time (Relax FoldConstant).

Why: TVM's Relax importer computes Einsum with TOPI's einsum, one loop nest over every
letter of every operand. A three-operand attention readout (``bhij,bjhd,hde->bie``) took
15.4 M multiply-adds there where the pairwise form takes 0.6 M, and a two-operand one ran
as an unscheduled loop (docs/BENCHMARKS.md, run 25). ``onnxpress compile`` runs this pass
first (backends/tvm/prepare.py); on onnxruntime the pass is verified like any lossless one
(only the summation order changes).

Refused, with a reason: unknown shapes, a letter repeated within one operand (diagonals),
a letter whose sizes differ between operands (broadcasting), ellipses whose dimensions
differ, and element types MatMul does not take.
"""

from __future__ import annotations

import itertools
import math
import string
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from onnxpress.core.context import PassContext, TensorShapes
from onnxpress.core.pass_base import Pass, PassResult
from onnxpress.core.registry import register_pass

FLOAT_TYPES = (TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE)


@dataclass(frozen=True)
class LowerEinsumOptions:
    """No options: every Einsum that passes the checks is lowered."""


@dataclass
class Term:
    """An operand (or intermediate result): its tensor and one letter per axis."""

    tensor: gs.Tensor
    letters: str


def parse_equation(equation: str, ranks: list[int]) -> tuple[list[str], str]:
    """(input terms, output term) with ellipses replaced by upper-case letters (ranks: the
    operands'); an implicit output is the letters that appear once, sorted, after the
    ellipsis. Raises ValueError on a malformed equation."""
    text = equation.replace(" ", "")
    lhs, arrow, rhs = text.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        raise ValueError(f"{len(terms)} terms for {len(ranks)} inputs")
    widest = max((r - len(t.replace("...", "")) for t, r in zip(terms, ranks, strict=True)),
                 default=0)  # fmt: skip
    spare = "".join(c for c in string.ascii_uppercase if c not in text)[: max(widest, 0)]
    expanded = []
    for term, rank in zip(terms, ranks, strict=True):
        own = rank - len(term.replace("...", ""))
        if "..." in term:
            term = term.replace("...", spare[len(spare) - own :] if own else "")
        if len(term) != rank or not term.isalpha():
            raise ValueError(f"term '{term}' does not match a rank-{rank} input")
        expanded.append(term)
    if arrow:
        out = rhs.replace("...", spare)
    else:
        counts = {c: "".join(expanded).count(c) for c in set("".join(expanded))}
        out = spare + "".join(sorted(c for c, n in counts.items() if n == 1 and c.islower()))
    if not out.isalpha() and out:
        raise ValueError(f"output term '{rhs}'")
    return expanded, out


class Lowering:
    """Emits the nodes of one Einsum; the last one writes the Einsum's output."""

    def __init__(
        self, graph: gs.Graph, node: gs.Node, sizes: dict[str, int], opset: int = 13
    ) -> None:
        self.graph, self.node, self.sizes, self.opset = graph, node, sizes, opset
        self.taken = set(graph.tensors()) | {n.name for n in graph.nodes}

    def _name(self, base: str) -> str:
        prefix = self.node.name or "einsum"
        candidate, i = f"{prefix}/{base}", 1
        while candidate in self.taken:
            candidate, i = f"{prefix}/{base}_{i}", i + 1
        self.taken.add(candidate)
        return candidate

    def op(self, op: str, inputs: list[gs.Tensor], **attrs: object) -> gs.Variable:
        out = gs.Variable(self._name(op.lower()))
        self.graph.nodes.append(gs.Node(op, self._name(op), attrs, list(inputs), [out]))
        return out

    def shape(self, letters: str) -> gs.Constant:
        dims = np.array([self.sizes[c] for c in letters], np.int64)
        return gs.Constant(self._name("shape"), dims)

    def transpose(self, term: Term, letters: str) -> Term:
        if term.letters == letters:
            return term
        perm = [term.letters.index(c) for c in letters]
        return Term(self.op("Transpose", [term.tensor], perm=perm), letters)

    def reduce(self, term: Term, keep: set[str]) -> Term:
        gone = [i for i, c in enumerate(term.letters) if c not in keep]
        if not gone:
            return term
        if self.opset < 13:  # Einsum's opset 12: ReduceSum takes its axes as an attribute
            summed = self.op("ReduceSum", [term.tensor], axes=gone, keepdims=0)
        else:
            axes = gs.Constant(self._name("axes"), np.array(gone, np.int64))
            summed = self.op("ReduceSum", [term.tensor, axes], keepdims=0)
        return Term(summed, "".join(c for c in term.letters if c in keep))

    def reshape(self, term: Term, groups: list[str]) -> gs.Tensor:
        """``term`` (its letters the concatenation of ``groups``) with one axis per group."""
        if all(len(g) == 1 for g in groups):
            return term.tensor
        dims = np.array([math.prod(self.sizes[c] for c in g) for g in groups], np.int64)
        return self.op("Reshape", [term.tensor, gs.Constant(self._name("shape"), dims)])

    def _size(self, operands: list[Term], out: str, pair: tuple[int, int]) -> int:
        """Elements of the result of contracting ``pair`` of ``operands``."""
        letters = set(operands[pair[0]].letters + operands[pair[1]].letters)
        return math.prod(self.sizes[c] for c in letters & _needed(operands, out, list(pair)))

    def contract(self, a: Term, b: Term, keep: set[str]) -> Term:
        batch = "".join(c for c in a.letters if c in b.letters and c in keep)
        summed = "".join(c for c in a.letters if c in b.letters and c not in keep)
        left = "".join(c for c in a.letters if c not in b.letters)
        right = "".join(c for c in b.letters if c not in a.letters)
        a = self.transpose(a, batch + left + summed)
        b = self.transpose(b, batch + summed + right)
        groups_a = ([batch] if batch else []) + [left, summed]
        groups_b = ([batch] if batch else []) + [summed, right]
        product = self.op("MatMul", [self.reshape(a, groups_a), self.reshape(b, groups_b)])
        result = Term(product, batch + left + right)
        if all(len(g) == 1 for g in [*groups_a, *groups_b]):
            return result
        return Term(self.op("Reshape", [product, self.shape(result.letters)]), result.letters)

    def emit(self, terms: list[str], out: str) -> int:
        """Writes the Einsum's output; returns the number of MatMuls."""
        operands = [Term(t, letters) for t, letters in zip(self.node.inputs, terms, strict=True)]
        operands = [self.reduce(o, _needed(operands, out, [i])) for i, o in enumerate(operands)]
        matmuls = 0
        while len(operands) > 1:
            i, j = min(
                itertools.combinations(range(len(operands)), 2),
                key=lambda pair: self._size(operands, out, pair),
            )
            merged = self.contract(operands[i], operands[j], _needed(operands, out, [i, j]))
            operands = [o for k, o in enumerate(operands) if k not in (i, j)] + [merged]
            matmuls += 1
        final = self.transpose(operands[0], out).tensor
        if any(final is t for t in self.node.inputs):
            final = self.op("Identity", [final])
        # the last node writes the Einsum's own output tensor
        target = self.node.outputs[0]
        self.node.outputs.clear()
        writer = next(n for n in self.graph.nodes if any(t is final for t in n.outputs))
        writer.outputs[0] = target
        return matmuls


def _needed(operands: list[Term], out: str, exclude: list[int]) -> set[str]:
    """The letters the output or an operand outside ``exclude`` holds."""
    rest = [o.letters for i, o in enumerate(operands) if i not in exclude]
    return set(out).union(*rest)


def refusal(node: gs.Node, shapes: TensorShapes) -> tuple[str, list[str], str, dict[str, int]]:
    """(reason or "", terms, output, letter sizes) for one Einsum node."""
    found = [shapes.get(t.name) for t in node.inputs]
    if any(d is None or any(x is None for x in d) for d in found):
        return "an input has no static shape", [], "", {}
    dims = [[int(x) for x in d if x is not None] for d in found if d is not None]
    code = shapes.elem_type(node.inputs[0].name)
    if code not in FLOAT_TYPES:
        return "element type is not float16, float32 or float64", [], "", {}
    try:
        terms, out = parse_equation(str(node.attrs.get("equation", "")), [len(d) for d in dims])
    except ValueError as exc:
        return f"equation '{node.attrs.get('equation')}': {exc}", [], "", {}
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, dims, strict=True):
        if len(set(term)) != len(term):
            return f"a repeated letter in '{term}' (a diagonal)", [], "", {}
        for c, d in zip(term, shape, strict=True):
            if sizes.setdefault(c, d) != d:
                return f"letter '{c}' has sizes {sizes[c]} and {d} (broadcasting)", [], "", {}
    if len(set(out)) != len(out) or any(c not in sizes for c in out):
        return f"output term '{out}' repeats a letter or names one no input has", [], "", {}
    return "", terms, out, sizes


@register_pass("lower-einsum")
class LowerEinsum(Pass[LowerEinsumOptions]):
    """Einsum as Transpose/Reshape/MatMul/ReduceSum, contracted pairwise (for TVM)."""

    options_type = LowerEinsumOptions
    lossless = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        found = [n for n in graph.nodes if n.op == "Einsum" and n.domain in (None, "", "ai.onnx")]
        if not found:
            return result
        shapes = ctx.analysis(TensorShapes, graph)
        for node in found:
            reason, terms, out, sizes = refusal(node, shapes)
            if reason:
                result.refuse(node.name, reason)
                continue
            matmuls = Lowering(graph, node, sizes, ctx.opset_of(graph)).emit(terms, out)
            node.outputs.clear()
            node.inputs.clear()
            result.count("einsum_lowered")
            result.count("matmuls", matmuls)
        graph.nodes = [n for n in graph.nodes if n.outputs or n.op != "Einsum"]
        graph.cleanup(remove_unused_node_outputs=False, remove_unused_graph_inputs=False)
        return result
