"""The incremental block-noise forward on ONNX Runtime (docs/noise.md section 10): fp32 and int8.

The bundle's segment graphs (export/blocks.py) cut a chain model at its modules' inputs B_i; the
cache graph runs the unperturbed forward and keeps B_1 .. B_{L-1}. Rows that perturb channel c of
module i are evaluated in *passes*: one call of segment i on the cached B_i with the module's
parameters in which channel c holds a row's perturbed values, one row per channel, so a pass
serves up to C_i rows (one per distinct channel) at the cost of one run of that module. Each
row's B_{i+1} is the cached one with channel c replaced; the segments after i run the rows
stacked along the batch axis, unperturbed. The same kernels (QLinearConv / QGemm in int8) with
the same constant scales compute every channel, so the losses equal a full forward's bit for bit
(tests/test_blocks_ort.py).

numpy + onnxruntime only: the path a device port mirrors with the bundle's graph files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from baffle_edge.perturb import BlockTable

ROWS_PER_CALL = 4096  # images per call of the segments after a row's module (bounds the activations)


class LazyBlockForward:
    """A session's ``block_forward``, set up at the first block-noise task by the session's
    ``_init_block_forward`` (``None``: rows run as full forwards, the reason in ``block_forward_reason``)."""

    def _reset_block_forward(self) -> None:
        self._block_forward, self.block_forward_reason, self._block_ready = None, None, False

    @property
    def block_forward(self):
        if not self._block_ready:
            self._block_ready = True
            self._init_block_forward()
        return self._block_forward

    @block_forward.setter
    def block_forward(self, value) -> None:
        self._block_forward, self._block_ready = value, True


class ChainRows:
    """The rows of a chain model's block forward (ONNX Runtime or LiteRT segments): grouped by module, each
    module's rows computed from the cached activation before it (``_module_rows``), then pushed through the
    rest of the chain (``_finish``); ``_logits_of`` turns the last segment's output into logits."""

    def logits(self, blocks: np.ndarray, values: list[np.ndarray]) -> np.ndarray:
        """Logits [n, B, classes] of the rows that replace block ``blocks[i]``'s values by ``values[i]``."""
        blocks = np.asarray(blocks)
        out = np.empty((len(blocks), *self.z.shape), dtype=np.float32)
        modules = self.blocks.module[blocks]
        for m in np.unique(modules):
            rows = np.flatnonzero(modules == m)
            i = self.chain[int(m)]
            nxt = self._module_rows(i, self.blocks.row[blocks[rows]], [values[r] for r in rows])
            out[rows] = self._logits_of(self._finish(i + 1, nxt))
        return out

    def _logits_of(self, out: np.ndarray) -> np.ndarray:
        return out


class OrtBlockForward(ChainRows):
    """``client.BlockForward`` for an ``OrtSession`` (float or int8) whose bundle has a chain plan."""

    def __init__(self, session, plan: dict, graphs: list[Path | bytes], blocks: BlockTable, make_session, *,
                 static_batch: bool = False):
        """``plan``: baffle.json's ``blocks`` entry (export/blocks.ChainPlan.to_json); ``graphs``:
        [cache, seg 0, seg 1, ...] as files or serialized models; ``make_session(graph)`` opens one.
        ``static_batch``: every segment call takes exactly the batch's B rows (an EP of static shapes,
        its sessions built for B: docs/npu.md), instead of chunks of up to ROWS_PER_CALL rows."""
        self.session, self.blocks, self.static_batch = session, blocks, static_batch
        self.modules, self.params = list(plan["modules"]), [list(p) for p in plan["params"]]
        self.boundaries = list(plan["boundaries"])
        unknown = [m for m in self.modules if m not in blocks.modules]
        if unknown or len(self.modules) != len(blocks.modules):
            raise ValueError(f"bundle block plan lists modules {self.modules}, the parameters have {list(blocks.modules)}")
        self._open = lambda: (make_session(graphs[0]), [make_session(g) for g in graphs[1:]])
        # a static-shape EP's sessions are built at the first cache(x), when the session knows its batch
        self.cache_session, self.segments = (None, None) if static_batch else self._open()
        self.chain = {blocks.modules.index(m): i for i, m in enumerate(self.modules)}
        # per chain module: how a row's values split into its tensors' rows (parameter order)
        shapes = {p["name"]: tuple(p["shape"]) for p in session.bundle.meta["parameters"]}
        self.row_sizes = [[int(np.prod(shapes[n][1:], dtype=np.int64)) for n in self._param_names(m)]
                          for m in self.modules]

    def _param_names(self, module: str) -> list[str]:
        return [p["name"] for p in self.session.bundle.meta["parameters"] if p["name"].rsplit(".", 1)[0] == module]

    def cache(self, x: np.ndarray) -> np.ndarray:
        """Run the unperturbed forward (the session's weights), keep B_1 .. B_{L-1}, return the logits."""
        if self.cache_session is None:
            self.cache_session, self.segments = self._open()
        self.feeds = self.session.graph_feeds(self.session.weight_set(0, None, None))
        out = self.cache_session.run(None, {self.boundaries[0]: x, **self.feeds})
        self.b = [x, *out[1:]]
        self.z = out[0]
        return self.z


    def _module_rows(self, i: int, channels: np.ndarray, values: list[np.ndarray]) -> np.ndarray:
        """B_{i+1} of each row [n, B, ...]: the cached one with the row's channel from a pass of seg i."""
        names = self.params[i]
        base = [self.feeds[n] for n in names]
        cached = self.b[i + 1] if i + 1 < len(self.b) else self.z
        nxt = np.repeat(cached[None], len(channels), axis=0)
        v = np.stack(values)  # [n, d_b]: a module's blocks all have one size
        cols = np.cumsum([0, *self.row_sizes[i]])
        rank = pass_numbers(channels)  # pass number of each row: rows on one channel go to different passes
        for p in range(int(rank.max()) + 1 if len(rank) else 0):
            sel = np.flatnonzero(rank == p)
            ch = channels[sel]
            tensors = [t.copy() for t in base]
            for t, a, b in zip(tensors, cols[:-1], cols[1:]):
                t[ch] = v[sel, a:b].reshape(len(sel), *t.shape[1:])
            y = self.segments[i].run(None, {self.boundaries[i]: self.b[i], **dict(zip(names, tensors))})[0]
            nxt[sel, :, ch] = np.moveaxis(y[:, ch], 1, 0)
        return nxt

    def _finish(self, start: int, b: np.ndarray) -> np.ndarray:
        """Run segments ``start`` .. L-1 (unperturbed) on rows' boundary tensors [n, B, ...]."""
        n, bsz = b.shape[:2]
        flat = b.reshape(n * bsz, *b.shape[2:])
        for j in range(start, len(self.segments)):
            feeds = {k: self.feeds[k] for k in self.params[j]}
            step = bsz if self.static_batch else max(bsz, ROWS_PER_CALL // bsz * bsz)
            flat = np.concatenate([self.segments[j].run(None, {self.boundaries[j]: flat[s:s + step], **feeds})[0]
                                   for s in range(0, len(flat), step)])
        return flat.reshape(n, bsz, *flat.shape[1:])


def pass_numbers(values: np.ndarray) -> np.ndarray:
    """For each entry, how many equal entries precede it (0 for the first of each value)."""
    order = np.argsort(values, kind="stable")
    v = values[order]
    starts = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])
    rank = np.arange(len(v)) - np.repeat(starts, np.diff(np.r_[starts, len(v)]))
    out = np.empty(len(v), dtype=np.int64)
    out[order] = rank
    return out
