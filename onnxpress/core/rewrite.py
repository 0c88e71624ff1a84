"""Rewrite rules: pattern -> check -> rewrite, where a refused match carries its reason.

A rule finds candidate matches (``pattern``), decides whether each may be rewritten
(``check`` returns None to accept, or a reason string to refuse) and then rewrites it
(``rewrite`` returns a per-match record for the report). ``apply_rule`` drives one rule
over a graph and files every accepted and refused candidate into a PassResult, so a rule
that did not fire always says why. Candidates are collected before the first rewrite, so a
rule sees the graph as it was when the pass started.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from onnxpress.core.context import PassContext
    from onnxpress.core.pass_base import PassResult

logger = logging.getLogger(__name__)

MatchT = TypeVar("MatchT")


class Rule(Generic[MatchT]):
    """One rewrite rule. Subclasses set ``name`` and implement the four methods below."""

    name: ClassVar[str] = ""

    def pattern(self, graph: gs.Graph, ctx: PassContext) -> Iterable[MatchT]:
        """Candidate matches, cheap to find; ``check`` decides which are rewritten."""
        raise NotImplementedError

    def anchor(self, match: MatchT) -> str:
        """The node name a match is reported under."""
        raise NotImplementedError

    def check(self, graph: gs.Graph, match: MatchT, ctx: PassContext) -> str | None:
        """None to accept the match, or the reason it is refused."""
        raise NotImplementedError

    def rewrite(self, graph: gs.Graph, match: MatchT, ctx: PassContext) -> dict[str, Any]:
        """Rewrite an accepted match in place; return its record for PassResult.details."""
        raise NotImplementedError


def apply_rule(rule: Rule[MatchT], graph: gs.Graph, ctx: PassContext, result: PassResult) -> int:
    """Run ``rule`` over every candidate of ``graph``; return how many were rewritten.

    Each rewrite's record gets ``rule`` and ``node`` keys (unless the rule set them) and is
    appended to ``result.details``; each refusal goes to ``result.refuse`` with its reason.
    """
    rewritten = 0
    for match in list(rule.pattern(graph, ctx)):
        anchor = rule.anchor(match)
        reason = rule.check(graph, match, ctx)
        if reason is not None:
            logger.debug("%s: refused %s: %s", rule.name, anchor, reason)
            result.refuse(anchor, reason)
            continue
        record = rule.rewrite(graph, match, ctx)
        record.setdefault("rule", rule.name)
        record.setdefault("node", anchor)
        result.details.append(record)
        logger.debug("%s: rewrote %s", rule.name, anchor)
        rewritten += 1
    return rewritten


def rule_node_name(rule: Rule[Any], anchor: str) -> str:
    """Name for a node a rule creates: the rule's name is kept in it (gs has no metadata)."""
    return f"{rule.name}/{anchor}"
