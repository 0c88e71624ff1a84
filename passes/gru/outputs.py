"""Step states of a fused recurrent chain, re-produced from the new op's Y and Y_h.

The chain's cells are in processing order; a reverse chain processes time T-1 first, so
cell k holds time step T-1-k, which is where the reverse op's Y keeps it. For every state
read outside the chain (the next cell's own nodes are replaced):
  * Concat(Unsqueeze(h_t, a) for t in time order, axis=a) -> Squeeze(Y, 1), Transpose
    moving time to axis a: torch's ``stack(outputs, 1)`` becomes one or two nodes;
  * the last processed state alone -> Squeeze(Y_h, 0);
  * any other -> Gather(Squeeze(Y, 1), t).
New nodes write the original tensors, so graph outputs keep their names.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs
from onnxpress.passes.gru.emit import Emitter, stacked_concat
from onnxpress.passes.gru.graph import GraphIndex, RecurrentCell, TensorTypes


class StepOutputs:
    """Rewires the readers of a chain's step states (h_new of each cell) to the fused op."""

    def __init__(
        self,
        emit: Emitter,
        index: GraphIndex,
        cells: Sequence[RecurrentCell],
        reverse: bool,
        y: gs.Tensor,
        y_last: gs.Tensor,
        masked: bool = False,
    ) -> None:
        self.emit, self.index, self.cells, self.reverse = emit, index, cells, reverse
        self.y, self.y_last = y, y_last
        self.masked = masked  # step outputs differ from the final state: never from Y_h
        self.concat: gs.Node | None = None  # the stacking Concat, replaced
        self.stacked: gs.Tensor | None = None  # its output, now written from Y
        self.stacked_axis = 0
        self.steps: gs.Tensor | None = None  # Squeeze(Y, 1): [T, batch, H] in time order

    def time_of(self, k: int) -> int:
        return len(self.cells) - 1 - k if self.reverse else k

    def rewire(self, types: TensorTypes, steps_type: tuple[int, list[int | str | None]]) -> None:
        emit, cells = self.emit, self.cells
        readers = [
            [
                c
                for c in cell.h_new.outputs
                if k + 1 == len(cells) or id(c) not in cells[k + 1].nodes
            ]
            for k, cell in enumerate(cells)
        ]
        outputs = [id(cell.h_new) in self.index.outputs for cell in cells]
        by_time = sorted(range(len(cells)), key=self.time_of)
        stacked = stacked_concat(
            self.index, [cells[k] for k in by_time], [readers[k] for k in by_time]
        )
        if stacked is not None:
            concat, axis, unsqueezes = stacked
            perm = [1, 2]
            perm.insert(axis, 0)
            target = concat.outputs[0]
            self.concat, self.stacked, self.stacked_axis = concat, target, axis
            self.steps = emit.one(
                "Squeeze", [self.y, emit.const("axes", [1])], output=target if axis == 0 else None
            )
            if axis != 0:
                emit.one("Transpose", [self.steps], {"perm": perm}, output=target)
            for t, unsqueeze in enumerate(unsqueezes):
                readers[by_time[t]].remove(unsqueeze)
        wanted = [k for k in range(len(cells)) if readers[k] or outputs[k]]
        if self.steps is None and any(k + 1 < len(cells) or self.masked for k in wanted):
            self.steps = emit.one("Squeeze", [self.y, emit.const("axes", [1])])
        if self.steps is not None:  # a later chain (a stacked layer) can take its X from here
            types[self.steps.name] = steps_type
        for k in wanted:
            if self.steps is None:  # only the last state is read
                emit.one("Squeeze", [self.y_last, emit.const("axes", [0])], output=cells[k].h_new)
            else:
                step = emit.const("step", np.array(self.time_of(k), np.int64))
                emit.one("Gather", [self.steps, step], {"axis": 0}, output=cells[k].h_new)

    def last_state(self, state: gs.Tensor, final: gs.Tensor) -> None:
        """The chain's last (kept) state from the op's Y_h or Y_c, where it is read."""
        if state.outputs or id(state) in self.index.outputs:
            self.emit.one("Squeeze", [final, self.emit.const("axes", [0])], output=state)
