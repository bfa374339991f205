"""The incremental block-noise forward on LiteRT int8 (docs/noise.md section 10): segment models.

The bundle's segment models (export/tflite_blocks.py: the int8 ``.tflite`` cut at each module's
int8 input B_i, every operator, constant and quantization parameter the full model's own) run as
one interpreter each, with the built-in kernels of ``TFLiteSession``:

    cache     seg 0 .. L-1 one after the other on the batch at the unperturbed integers: keeps
              B_1 .. B_L (the logits), bit-identical to the full model's forward
    rows      of module i in *passes* (runtimes/ort_incremental.py): seg i on the cached B_i with the
              module's integers written in place, channel c holding one row's perturbed values (up
              to C_i rows per pass); each row's B_{i+1} is the cached one with channel c (the last,
              NHWC axis) replaced; seg i+1 .. L-1, unperturbed, finish the rows

Integer segments finish many rows per call, stacked along the batch (int8 kernels are exact
integer arithmetic: a sample's output does not depend on its neighbours). A segment with float
arithmetic (the float-logits head's FULLY_CONNECTED) runs each row at the batch's own size: the
float GEMM's blocking (and its small-batch path) depends on the batch, so stacked rows could round
differently from a full forward (measured: equal for batch 20 and 32, 4e-9 apart at batch 7).
So every row's logits equal the full model's at that row's weights, bit for bit
(tests/test_tflite_blocks.py).

numpy + ai_edge_litert only: the path a device port mirrors with the bundle's segment files.
"""
from __future__ import annotations

import numpy as np

from baffle_edge.bundle import dequantize_output
from baffle_edge.perturb import BlockTable

from .ort_incremental import pass_numbers

ROWS_PER_CALL = 4096  # images per call of an integer segment finishing rows (bounds the activations)


def tflite_array(row: dict, q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """What an interpreter's constant tensor holds for a parameter's integers ``q`` (torch layout):
    ``q`` in the TFLite layout (``row['permutation']``), or float32(q * scale) for a float tensor."""
    if row["tflite_dtype"] == "float32":  # float-logits head: the dequantized integers, in float32
        q = q.astype(np.float32) * scale.astype(np.float32)
    return np.transpose(q, row["permutation"])


class Segment:
    """One segment model's interpreter: its input / output, its module's constant tensors."""

    def __init__(self, interp, content: bytes, plan_row: dict, params: list[tuple[int, dict, np.ndarray, int]]):
        self.interp, self.content = interp, content  # the bytes stay alive: constants point into them
        self.input, self.output = int(plan_row["input"]), int(plan_row["output"])
        self.params = params  # (tensor index in the segment, format row, scale broadcast, table position)
        self.float = any(np.dtype(d["dtype"]) == np.float32 for d in interp.get_tensor_details()
                         if d["index"] not in {p[0] for p in params} and d["index"] != self.input)
        self.batch = int(interp.get_input_details()[0]["shape"][0])
        self.written = None  # the weight list held (writes of the same list are skipped)

    def write(self, qs: list[np.ndarray]) -> None:
        """Write this segment's module integers from ``qs`` (a full weight set, table order)."""
        if qs is self.written:
            return
        for index, row, scale, t in self.params:
            view = self.interp.tensor(index)()
            view[...] = tflite_array(row, qs[t], scale)
            del view  # invoke refuses to run while a view into internal data is alive
        self.written = qs

    def run(self, x: np.ndarray) -> np.ndarray:
        if len(x) != self.batch:
            self.interp.resize_tensor_input(self.input, list(x.shape))
            self.interp.allocate_tensors()
            self.batch, held, self.written = len(x), self.written, None
            if held is not None:
                self.write(held)
        self.interp.set_tensor(self.input, x)
        self.interp.invoke()
        return self.interp.get_tensor(self.output).copy()


class TFLiteBlockForward:
    """``client.BlockForward`` for a ``TFLiteSession`` whose bundle has segment models."""

    def __init__(self, session, plan: dict, contents: list[bytes], blocks: BlockTable, make_interpreter):
        """``plan``: baffle.json's ``formats.tflite-int8.blocks`` (export/tflite_blocks.py); ``contents``:
        the segment models' bytes; ``make_interpreter(bytes)`` opens one (the session's resolver)."""
        self.session, self.blocks = session, blocks
        self.modules = list(plan["modules"])
        unknown = [m for m in self.modules if m not in blocks.modules]
        if unknown or len(self.modules) != len(blocks.modules) or len(contents) != len(self.modules):
            raise ValueError(f"bundle block plan lists modules {self.modules} ({len(contents)} segment files), "
                             f"the parameters have {list(blocks.modules)}")
        position = {t.name: i for i, t in enumerate(session.table.tensors)}
        rows = {r["param"]: r for r in session.meta["tensors"]}
        self.segments, self.tensors = [], []
        for content, row, params in zip(contents, plan["segments"], plan["params"]):
            interp = make_interpreter(content)
            interp.allocate_tensors()
            ps = [(int(row["tensors"][p]), rows[p], session._scales[position[p]], position[p]) for p in params]
            self.segments.append(Segment(interp, content, row, ps))
            self.tensors.append([position[p] for p in params])
        self.chain = {blocks.modules.index(m): i for i, m in enumerate(self.modules)}
        self._out = session.meta["output"]

    def cache(self, x: np.ndarray) -> np.ndarray:
        """Run seg 0 .. L-1 at the session's integers on the quantized batch, keep B_1 .. B_L; the logits."""
        q = self.session.q
        self.b = [x]
        for seg in self.segments:
            seg.write(q)
            self.b.append(seg.run(self.b[-1]))
        self.z = dequantize_output(self.b[-1], self._out)
        return self.z

    def logits(self, blocks: np.ndarray, values: list[np.ndarray]) -> np.ndarray:
        """Logits [n, B, classes] of the rows that replace block ``blocks[i]``'s integers by ``values[i]``."""
        blocks = np.asarray(blocks)
        out = np.empty((len(blocks), *self.z.shape), dtype=np.float32)
        modules = self.blocks.module[blocks]
        for m in np.unique(modules):
            rows = np.flatnonzero(modules == m)
            i = self.chain[int(m)]
            nxt = self._module_rows(i, self.blocks.row[blocks[rows]], [values[r] for r in rows])
            out[rows] = dequantize_output(self._finish(i + 1, nxt), self._out)
        return out

    def _module_rows(self, i: int, channels: np.ndarray, values: list[np.ndarray]) -> np.ndarray:
        """B_{i+1} of each row [n, B, ...]: the cached one with the row's channel from a pass of seg i."""
        seg, q = self.segments[i], self.session.q
        nxt = np.repeat(self.b[i + 1][None], len(channels), axis=0)
        v = np.stack(values)  # [n, d_b]: a module's blocks all have one size
        table = self.session.table.tensors
        cols = np.cumsum([0, *(table[t].size // table[t].shape[0] for t in self.tensors[i])])
        rank = pass_numbers(channels)  # pass number of each row: rows on one channel go to different passes
        try:
            for p in range(int(rank.max()) + 1 if len(rank) else 0):
                sel = np.flatnonzero(rank == p)
                ch = channels[sel]
                moved = list(q)
                for t, a, b in zip(self.tensors[i], cols[:-1], cols[1:]):
                    moved[t] = q[t].copy()
                    moved[t][ch] = v[sel, a:b].reshape(len(sel), *q[t].shape[1:])
                seg.write(moved)
                y = seg.run(self.b[i])
                nxt[sel, ..., ch] = np.moveaxis(y[..., ch], -1, 0)
        finally:
            seg.write(q)  # the unperturbed integers back: later calls finish rows through this segment
        return nxt

    def _finish(self, start: int, b: np.ndarray) -> np.ndarray:
        """Run segments ``start`` .. L-1 (unperturbed) on rows' boundary tensors [n, B, ...]."""
        n, bsz = b.shape[:2]
        flat = b.reshape(n * bsz, *b.shape[2:])
        for seg in self.segments[start:]:
            seg.write(self.session.q)
            step = bsz if seg.float else max(bsz, ROWS_PER_CALL // bsz * bsz)  # float arithmetic: a batch per call
            flat = np.concatenate([seg.run(flat[s:s + step]) for s in range(0, len(flat), step)])
        return flat.reshape(n, bsz, *flat.shape[1:])
