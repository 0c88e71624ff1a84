"""Inline elementwise producers into their consumers, without letting an expression blow up.

A fused elementwise kernel (BN, GELU, x * sigmoid(x)) runs fastest as one loop nest, every
intermediate computed in registers: each spatial block whose consumers are all spatial is
inlined (``sch.compute_inline``). Inlining puts the producer's expression at every read of
it, and TVM's passes walk each copy: a chain of n steps that each read a value twice (a
logistic map x <- r x (1 - x)) grows as 2^n, and a 60-step chain did not compile in 10
minutes (14 steps: 20 s, 16 steps: minutes). A
producer stays a block (its values in a buffer, computed once) when inlining it would take
a consumer's expression past ``INLINE_EXPR_LIMIT`` nodes; a chain then costs what its ops
cost. Real kernels stay below the limit: the largest seen, efficientnet_b0's fast exp of a
SiLU, reaches 658 nodes (LLVM computes each repeated sub-expression once).
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

INLINE_EXPR_LIMIT = 4096  # expression nodes (as a tree) a block may reach by inlining producers
_CHILDREN = ("a", "b", "value", "condition", "true_value", "false_value", "then_case", "else_case")
_LISTS = ("args", "indices", "seq")


def expression_size(stmt: Any, buffer: Any = None, limit: int = 1 << 30) -> tuple[int, int]:
    """(nodes, loads of ``buffer``) in ``stmt``, walking its expression tree (a shared
    sub-expression counts each time it is used, as it will be computed); stops counting
    past ``limit`` nodes."""
    from tvm.ir.expr import TensorLoad

    nodes = loads = 0
    stack = [stmt]
    while stack and nodes <= limit:
        node = stack.pop()
        nodes += 1
        if buffer is not None and isinstance(node, TensorLoad) and node.source.same_as(buffer):
            loads += 1
        for name in _CHILDREN:
            child = getattr(node, name, None)
            if child is not None and not isinstance(child, (int, float, str)):
                stack.append(child)
        for name in _LISTS:
            children = getattr(node, name, None)
            if children is not None and not isinstance(children, (str, bytes)):
                stack.extend(children)
    return nodes, loads


def _inline_grows_too_much(sch: Any, block: Any, consumers: list[Any]) -> bool:
    """Whether inlining ``block`` would take one of its consumers past ``INLINE_EXPR_LIMIT``
    expression nodes."""
    stmt = sch.get(block)
    if len(stmt.writes) != 1:
        return False
    buffer = stmt.writes[0].source
    produced, _ = expression_size(stmt.body, limit=INLINE_EXPR_LIMIT)
    for consumer in consumers:
        size, loads = expression_size(sch.get(consumer).body, buffer, INLINE_EXPR_LIMIT)
        if size + loads * produced > INLINE_EXPR_LIMIT:
            logger.debug(
                "not inlined: %s (%d nodes) read %d times by %s (%d nodes)",
                stmt.name_hint,
                produced,
                loads,
                sch.get(consumer).name_hint,
                size,
            )
            return True
    return False


def inline_elementwise(sch: Any) -> bool:
    """Inline every spatial block whose consumers are all spatial blocks (BN, GELU chains),
    except where a consumer would grow past ``INLINE_EXPR_LIMIT`` nodes; whether anything
    was inlined."""
    changed = False
    kept: set[str] = set()  # blocks left whole; inlining into their consumers can only grow
    progress = True
    while progress:
        progress = False
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            stmt = sch.get(block)
            if stmt.name_hint in kept:
                continue
            consumers = sch.get_consumers(block)
            if not consumers or stmt.init is not None:
                continue
            if any(sch.get(c).init is not None for c in consumers):
                continue
            if _inline_grows_too_much(sch, block, consumers):
                kept.add(stmt.name_hint)
                continue
            try:
                sch.compute_inline(block)
            except Exception as exc:  # writes an output, or not inlinable
                logger.debug("not inlined: %s", exc)
                continue
            changed = progress = True
            break
    return changed
