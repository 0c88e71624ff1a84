"""The pass manager: run a pipeline over one model, verifying after every pass.

After each pass the graph is exported and checked (checker + strict shape inference); at
the ``numeric`` level it is also run on onnxruntime against the original model: lossless
passes within a tight relative tolerance, lossy passes by their metric and budget. A
failure raises VerificationError naming the pass; nothing is returned, so nothing is written.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx

from onnxpress.core import sizing
from onnxpress.core.calibration_data import CalibrationData
from onnxpress.core.context import PassContext, StatisticsStore
from onnxpress.core.emulated_runner import exact_int8_runner, exact_spread
from onnxpress.core.errors import OnnxpressError, PassError, PipelineError, VerificationError
from onnxpress.core.int8_layers import integer_layers
from onnxpress.core.ir import copy_model, detach_removed_nodes, to_graph, to_model
from onnxpress.core.pass_base import Pass, PassResult
from onnxpress.core.pipeline import format_pipeline
from onnxpress.core.precision import compute_dtype
from onnxpress.core.report import PassRecord, Report, VerifyOutcome
from onnxpress.core.stats import model_stats
from onnxpress.core.targets import Target, host_judges, host_target, parse_targets
from onnxpress.core.verdict import judge_targets, settle
from onnxpress.core.verify import (
    LOSSLESS_TOLERANCE,
    METRICS,
    check_structure,
    compare_lossless,
    compare_metric,
    reference_outputs,
    run_all,
    verification_inputs,
    verification_runner,
)

logger = logging.getLogger(__name__)

VerifyLevel = Literal["off", "structure", "numeric"]
# on_progress(event, index, total, pass_name); event is "start" or "done".
ProgressCallback = Callable[[str, int, int, str], None]


@dataclass(frozen=True)
class VerifyConfig:
    level: VerifyLevel = "numeric"
    metric: str | None = None  # overrides each lossy pass's own metric
    budget: float | None = None  # overrides each lossy pass's default budget
    tolerance: float = LOSSLESS_TOLERANCE
    holdout: int = 0  # last calibration batches kept from the passes, used only to verify

    def __post_init__(self) -> None:
        if self.level not in ("off", "structure", "numeric"):
            raise PipelineError(
                f"verify level must be off, structure or numeric, not {self.level!r}"
            )
        if self.metric is not None and self.metric not in METRICS:
            raise PipelineError(f"unknown metric '{self.metric}' (metrics: {', '.join(METRICS)})")
        if self.budget is not None and not 0 <= self.budget < float("inf"):
            raise PipelineError(f"budget must be a finite number >= 0, not {self.budget}")
        if not 0 <= self.tolerance < float("inf"):
            raise PipelineError(f"tolerance must be a finite number >= 0, not {self.tolerance}")
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, int) or self.holdout < 0:
            raise PipelineError(f"holdout must be an integer >= 0, not {self.holdout!r}")


class PassManager:
    def __init__(
        self,
        passes: list[Pass[Any]],
        verify: VerifyConfig | None = None,
        calibration: CalibrationData | None = None,
        seed: int = 0,
        on_progress: ProgressCallback | None = None,
        targets: tuple[Target, ...] | None = None,
        pass_timeout: float | None = None,
        statistics: StatisticsStore | None = None,
    ) -> None:
        if not passes:
            raise PipelineError("empty pipeline")
        self.passes = passes
        self.targets = targets or parse_targets(None)
        self.targets_named = targets is not None
        self.verify = verify or VerifyConfig()
        self.calibration = calibration
        self.seed = seed
        self.on_progress = on_progress
        if pass_timeout is not None and not 0 < pass_timeout < 1e9:
            raise PipelineError(
                f"pass timeout must be a positive number of seconds, not {pass_timeout}"
            )
        self.pass_timeout = pass_timeout
        self.statistics = statistics
        self._original_structure_error: str | None = None  # checked only when a pass fails

    def run(self, model: onnx.ModelProto, copy: bool = True) -> tuple[onnx.ModelProto, Report]:
        """Run every pass on a copy of ``model``; return the result and its report.

        ``copy=False``: the caller hands ``model`` over (it must not use it afterwards), which
        saves a copy of the weights (the CLI, which loaded it for this run)."""
        started = time.perf_counter()
        original = copy_model(model) if copy else model
        level = self.verify.level
        verification_data = self.calibration
        if self.calibration is not None:
            self.calibration = self.calibration.fitted_to(original)
            self.calibration.validate(original)
            verification_data = self.calibration
            if self.verify.holdout:
                self.calibration, verification_data = self.calibration.split(self.verify.holdout)
        stats = model_stats(original)
        compute = compute_dtype(original)  # float16 inside: lossless passes get its rounding
        report = Report(
            pipeline=format_pipeline(self.passes),
            before=stats,
            after=stats,
            verify_level=level,
            targets=[t.name for t in self.targets],
        )
        feeds: list[dict[str, np.ndarray]] = []
        reference: list[list[np.ndarray]] = []
        output_names: list[str] = []
        if level == "numeric":
            feeds = verification_inputs(original, verification_data, self.seed)
            runner, reference = reference_outputs(
                original, feeds, verification_data is not None, verification_runner
            )
            output_names = runner.output_names
            del runner  # its session holds a copy of the weights; the passes need the memory
        previous = reference
        as_users_run = False  # after a lossy pass (or a runs_optimized one): see below
        ctx = PassContext(
            template=original,
            original=original,
            calibration=self.calibration,
            seed=self.seed,
            targets=self.targets,
            targets_named=self.targets_named,
            statistics=self.statistics,
        )
        graph = to_graph(copy_model(original))
        current = original
        last_digest: bytes | None = None  # of the model the previous pass left
        total = len(self.passes)
        for index, pass_ in enumerate(self.passes):
            name = pass_.name
            self._progress("start", index, total, name)
            t0 = time.perf_counter()
            result = self._run_pass(pass_, graph, ctx)
            seconds = time.perf_counter() - t0
            ctx.invalidate(pass_.preserves)
            before = current
            try:
                current = to_model(graph, original)
            except OnnxpressError:
                raise
            except Exception as exc:
                raise VerificationError(name, f"graph cannot be exported: {exc}") from exc
            # A model byte-identical to the one the previous pass left (and that passed its
            # checks) keeps that model's verification, outputs and statistics.
            digest = sizing.model_digest(current)
            unchanged = digest is not None and digest == last_digest
            last_digest = digest
            outcome = VerifyOutcome(level=level)
            if level != "off" and not unchanged:
                self._check_structure(name, current, original)
            if level == "numeric":
                # after a lossy pass the model runs as users run it: QDQ on integer kernels; so
                # does a lossless pass that is exact only that way (runs_optimized: QOperator
                # ops as QDQ groups, which onnxruntime fuses back into the same kernels)
                optimized = as_users_run or not pass_.lossless or pass_.runs_optimized
                try:
                    outputs = (
                        previous
                        if unchanged
                        else run_all(verification_runner(current, optimized), feeds)
                    )
                except Exception as exc:
                    raise VerificationError(
                        name, f"onnxruntime cannot run the result: {_first_line(exc)}"
                    ) from exc
                if pass_.lossless:
                    baseline = previous if as_users_run else reference
                    checked, converted = outputs, optimized and not (as_users_run or unchanged)
                    if converted:
                        # a runs_optimized pass: its input as users run it too (a QDQ input
                        # run unoptimized is float fake-quant, a step away in places); where
                        # int8 kernels saturate, each format may get other kernels
                        if host_target().saturates:
                            baseline, checked = (
                                run_all(exact_int8_runner(m), feeds) for m in (before, current)
                            )
                        else:
                            baseline = run_all(verification_runner(before, True), feeds)
                    tolerance = self.verify.tolerance
                    cmp = compare_lossless(output_names, baseline, checked, tolerance, compute)
                    if converted and not cmp.ok:  # two integer implementations' ties
                        tolerance += exact_spread(current, feeds, baseline)
                        cmp = compare_lossless(output_names, baseline, checked, tolerance, compute)
                    as_users_run |= pass_.runs_optimized and not unchanged
                else:
                    as_users_run = True
                    metric = self.verify.metric or pass_.metric
                    budget = (
                        self.verify.budget
                        if self.verify.budget is not None
                        else pass_.default_budget
                    )
                    exact = pass_.exact_int8 and host_target().saturates
                    expected = run_all(exact_int8_runner(original), feeds) if exact else reference
                    cmp = compare_metric(output_names, expected, outputs, metric, budget)
                outcome = VerifyOutcome(level, cmp.metric, cmp.value, cmp.limit, cmp.output)
                hint = f"; {pass_.recovery_hint}" if pass_.recovery_hint else ""
                # an unchanged model keeps its targets' verdict, unless this CPU cannot judge it
                judged = (
                    {}
                    if pass_.lossless or (unchanged and host_judges(self.targets))
                    else judge_targets(
                        current, feeds, output_names, reference, metric, budget, self.targets
                    )
                )
                quantized = not pass_.lossless and bool(integer_layers(current))
                settle(name, outcome, cmp, judged, quantized, self.targets, hint)
                previous = outputs
            after = report.after if unchanged else model_stats(current)
            report.passes.append(
                PassRecord(
                    name,
                    pass_.spec(),
                    pass_.lossless,
                    seconds,
                    report.after,
                    after,
                    result,
                    outcome,
                )
            )
            report.after = after
            logger.info("pass %s: %s in %.3fs", name, result.counts, seconds)
            self._progress("done", index, total, name)
        report.seconds = time.perf_counter() - started
        return current, report

    def _check_structure(
        self, name: str, model: onnx.ModelProto, original: onnx.ModelProto
    ) -> None:
        """checker + strict shape inference; an error the original model has too (onnx's own
        inference gaps, e.g. a function op's default attribute) is not the pass's fault."""
        try:
            check_structure(model)
        except Exception as exc:
            reason = _first_line(exc)
            if self._original_structure_error is None:
                try:
                    check_structure(original)
                    self._original_structure_error = ""
                except Exception as original_exc:
                    self._original_structure_error = _first_line(original_exc)
            if reason != self._original_structure_error:
                raise VerificationError(name, reason) from exc
            logger.warning("after pass %s: the input model fails this check too: %s", name, reason)

    def _run_pass(self, pass_: Pass[Any], graph: Any, ctx: PassContext) -> PassResult:
        try:
            with _time_limit(self.pass_timeout, pass_.name):
                result = pass_.run(graph, ctx)
        except (KeyboardInterrupt, OnnxpressError):
            raise
        except SystemExit as exc:
            raise PassError(pass_.name, f"called sys.exit({exc.code!r})") from None
        except Exception as exc:
            raise PassError(pass_.name, f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(result, PassResult):
            raise PassError(pass_.name, f"run() returned {type(result).__name__}, not PassResult")
        stale = detach_removed_nodes(graph)
        if stale:
            logger.debug("pass %s left %d links to removed nodes; detached", pass_.name, stale)
        return result

    def _progress(self, event: str, index: int, total: int, name: str) -> None:
        if self.on_progress is not None:
            self.on_progress(event, index, total, name)


def bisect(
    model: onnx.ModelProto,
    passes: list[Pass[Any]],
    verify: VerifyConfig,
    calibration: CalibrationData | None = None,
    seed: int = 0,
    targets: tuple[Target, ...] | None = None,
) -> int | None:
    """Index of the first pass whose prefix of the pipeline breaks the model, or None.

    Each probe runs a prefix with per-pass verification off and checks only its end result
    against the original (structure and numerics, whatever ``verify.level`` says), so a
    pipeline of n passes needs about log2(n) runs. A prefix is built for ``targets`` and
    judged as the manager judges a pass (this CPU's run and each target's emulated int8).
    """
    chosen = targets or parse_targets(None)
    verification_data = calibration
    if calibration is not None and verify.holdout:
        calibration, verification_data = calibration.fitted_to(model).split(verify.holdout)
    feeds = verification_inputs(model, verification_data, seed)
    runner, reference = reference_outputs(
        model, feeds, verification_data is not None, verification_runner
    )

    def fails(prefix: int) -> bool:
        head = passes[:prefix]
        try:
            candidate, _ = PassManager(
                head, VerifyConfig(level="off"), calibration, seed, targets=targets
            ).run(model)
            check_structure(candidate)
            outputs = run_all(verification_runner(candidate), feeds)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            logger.info("bisect: prefix of %d passes fails: %s", prefix, _first_line(exc))
            return True
        lossy = [p for p in head if not p.lossless]
        if not lossy:
            cmp = compare_lossless(
                runner.output_names, reference, outputs, verify.tolerance, compute_dtype(model)
            )
        else:
            metric = verify.metric or lossy[0].metric
            budgets = [p.default_budget for p in lossy if p.default_budget is not None]
            budget = verify.budget if verify.budget is not None else max(budgets, default=None)
            cmp = compare_metric(runner.output_names, reference, outputs, metric, budget)
        logger.info("bisect: prefix of %d passes: %s %.3g", prefix, cmp.metric, cmp.value)
        if not lossy:
            return not cmp.ok
        names = runner.output_names
        judged = judge_targets(candidate, feeds, names, reference, metric, budget, chosen)
        outcome = VerifyOutcome(verify.level, cmp.metric, cmp.value, cmp.limit, cmp.output)
        quantized = bool(integer_layers(candidate))
        try:
            settle(f"prefix of {prefix}", outcome, cmp, judged, quantized, chosen, "")
        except VerificationError as exc:
            logger.info("bisect: prefix of %d passes fails: %s", prefix, exc)
            return True
        return False

    if not fails(len(passes)):
        return None
    low, high = 1, len(passes)
    while low < high:
        mid = (low + high) // 2
        if fails(mid):
            high = mid
        else:
            low = mid + 1
    return low - 1


def _time_limit(seconds: float | None, name: str) -> contextlib.AbstractContextManager[None]:
    """Raise PassError naming the pass when it runs past ``seconds``."""
    return time_limit(
        seconds, lambda: PassError(name, f"did not finish within {seconds:g} s (--pass-timeout)")
    )


@contextlib.contextmanager
def time_limit(seconds: float | None, error: Callable[[], Exception]) -> Iterator[None]:
    """Raise ``error()`` when the block runs past ``seconds`` (SIGALRM: Unix, main thread
    only; elsewhere no limit)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not seconds or not usable:
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise error()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0] if "\n" in text else text
