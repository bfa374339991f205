"""The incremental block-noise forward on ONNX Runtime (docs/noise.md section 10): fp32 and int8.

The bundle's segment graphs (export/blocks.py) cut a chain model at its modules' inputs B_i; the
cache graph runs the unperturbed forward and keeps B_1 .. B_{L-1}. Any other graph of Conv / Gemm
modules (residual adds, GroupNorm: export/graph_blocks.py) has per module m a module segment (m's
input -> m's output) and a rest segment (m's output + the cached side tensors -> logits). Rows that perturb channel c of
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

import weakref
from pathlib import Path

import numpy as np

from baffle_edge.perturb import BlockTable

ROWS_PER_CALL = 4096  # images per call of the segments after a row's module (bounds the activations)
REST_ELEMENTS = 1 << 23  # a graph plan's rest segment: at most this many values of its cut input per call
# (a rest re-runs the net from the module on: 4,096 images of WRN-10-2's 32 x 28 x 28 maps peaked at +1.9 GB)


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
    """The rows of a model's block forward (ONNX Runtime or LiteRT segments): grouped by module, each
    module's rows computed from the cached activation before it (``_module_rows``), then pushed through
    what follows the module (``_rest``: the rest of a chain, ``_finish``); ``_logits_of`` turns the
    last segment's output into logits."""

    def logits(self, blocks: np.ndarray, values: list[np.ndarray]) -> np.ndarray:
        """Logits [n, B, classes] of the rows that replace block ``blocks[i]``'s values by ``values[i]``."""
        blocks = np.asarray(blocks)
        out = np.empty((len(blocks), *self.z.shape), dtype=np.float32)
        modules = self.blocks.module[blocks]
        for m in np.unique(modules):
            rows = np.flatnonzero(modules == m)
            i = self.chain[int(m)]
            nxt = self._module_rows(i, self.blocks.row[blocks[rows]], [values[r] for r in rows])
            out[rows] = self._logits_of(self._rest(i, nxt))
        return out

    def _rest(self, i: int, rows: np.ndarray) -> np.ndarray:
        """What follows module i, run on its rows' outputs [n, B, ...]: a chain's later segments."""
        return self._finish(i + 1, rows)

    def _logits_of(self, out: np.ndarray) -> np.ndarray:
        return out


class OrtBlockForward(ChainRows):
    """``client.BlockForward`` for an ``OrtSession`` (float or int8) whose bundle has a block plan: a chain
    (``kind`` absent: export/blocks.ChainPlan) or a graph plan (``"kind": "graph"``: export/graph_blocks.py,
    residual adds and normalisations; each module's rows then finish in its own rest segment, fed the
    cached side tensors repeated per row)."""

    def __init__(self, session, plan: dict, graphs: dict[str, Path | bytes], blocks: BlockTable, make_session, *,
                 static_batch: bool = False):
        """``plan``: baffle.json's ``blocks`` entry; ``graphs``: role (``block_cache``, ``block_seg<i>`` or
        ``block_mod<i>`` / ``block_rest<i>``) -> file or serialized model; ``make_session(graph)`` opens one.
        ``static_batch``: every segment call takes exactly the batch's B rows (an EP of static shapes,
        its sessions built for B: docs/npu.md), instead of chunks of up to ROWS_PER_CALL rows."""
        # a weak reference: the session holds its forward, and a cycle would keep every refreshed bundle's
        # segment sessions alive until the garbage collector ran (measured: +230 MB per round, WRN-10-2 int8)
        self.session, self.blocks, self.static_batch = weakref.proxy(session), blocks, static_batch
        self.modules, self.params = list(plan["modules"]), [list(p) for p in plan["params"]]
        self.kind = plan.get("kind", "chain")
        if self.kind == "graph":
            seg = plan["segments"]
            self.input, self.output = plan["input"], plan["output"]
            self.inputs, self.outputs = [s["input"] for s in seg], [s["output"] for s in seg]
            self.sides, self.rest_params = [list(s["sides"]) for s in seg], [list(s["rest_params"]) for s in seg]
            self.module_roles = [f"block_mod{i}" for i in range(len(self.modules))]
        elif self.kind == "chain":
            bd = list(plan["boundaries"])
            self.input, self.output, self.inputs, self.outputs = bd[0], bd[-1], bd[:-1], bd[1:]
            self.module_roles = [f"block_seg{i}" for i in range(len(self.modules))]
        else:
            raise ValueError(f"bundle block plan of unknown kind {self.kind!r} (known: chain, graph)")
        unknown = [m for m in self.modules if m not in blocks.modules]
        if unknown or len(self.modules) != len(blocks.modules):
            raise ValueError(f"bundle block plan lists modules {self.modules}, the parameters have {list(blocks.modules)}")
        self._open = lambda: {role: make_session(g) for role, g in graphs.items()}
        # a static-shape EP's sessions are built at the first cache(x), when the session knows its batch
        self.sessions = None if static_batch else self._open()
        self.chain = {blocks.modules.index(m): i for i, m in enumerate(self.modules)}
        # per module: how a row's values split into its tensors' rows (parameter order)
        shapes = {p["name"]: tuple(p["shape"]) for p in session.bundle.meta["parameters"]}
        self.row_sizes = [[int(np.prod(shapes[n][1:], dtype=np.int64)) for n in self._param_names(m)]
                          for m in self.modules]

    def _param_names(self, module: str) -> list[str]:
        return [p["name"] for p in self.session.bundle.meta["parameters"] if p["name"].rsplit(".", 1)[0] == module]

    def cache(self, x: np.ndarray) -> np.ndarray:
        """Run the unperturbed forward (the session's weights), keep every tensor a segment reads, return the logits."""
        if self.sessions is None:
            self.sessions = self._open()
        self.feeds = self.session.graph_feeds(self.session.weight_set(0, None, None))
        cache = self.sessions["block_cache"]
        out = cache.run(None, {self.input: x, **self.feeds})
        self.t = {self.input: x, **{o.name: v for o, v in zip(cache.get_outputs(), out)}}
        self.z = out[0]
        return self.z

    def _module_rows(self, i: int, channels: np.ndarray, values: list[np.ndarray]) -> np.ndarray:
        """Module i's output of each row [n, B, ...]: the cached one with the row's channel from a pass of
        its segment (a chain's B_{i+1})."""
        names = self.params[i]
        base = [self.feeds[n] for n in names]
        nxt = np.repeat(self.t[self.outputs[i]][None], len(channels), axis=0)
        v = np.stack(values)  # [n, d_b]: a module's blocks all have one size
        cols = np.cumsum([0, *self.row_sizes[i]])
        rank = pass_numbers(channels)  # pass number of each row: rows on one channel go to different passes
        seg, data = self.sessions[self.module_roles[i]], {self.inputs[i]: self.t[self.inputs[i]]}
        for p in range(int(rank.max()) + 1 if len(rank) else 0):
            sel = np.flatnonzero(rank == p)
            ch = channels[sel]
            tensors = [t.copy() for t in base]
            for t, a, b in zip(tensors, cols[:-1], cols[1:]):
                t[ch] = v[sel, a:b].reshape(len(sel), *t.shape[1:])
            y = seg.run(None, {**data, **dict(zip(names, tensors))})[0]
            nxt[sel, :, ch] = np.moveaxis(y[:, ch], 1, 0)
        return nxt

    def _rest(self, i: int, rows: np.ndarray) -> np.ndarray:
        if self.kind == "chain":
            return super()._rest(i, rows)
        if self.outputs[i] == self.output:  # a head that ends the graph: its output is the logits
            return rows
        sides = {s: self.t[s] for s in self.sides[i]}
        return self._stacked(self.sessions[f"block_rest{i}"], self.outputs[i], rows, sides, self.rest_params[i],
                             images=REST_ELEMENTS // max(1, rows[0, 0].size))

    def _finish(self, start: int, b: np.ndarray) -> np.ndarray:
        """Run a chain's segments ``start`` .. L-1 (unperturbed) on rows' boundary tensors [n, B, ...]."""
        for j in range(start, len(self.modules)):
            b = self._stacked(self.sessions[self.module_roles[j]], self.inputs[j], b, {}, self.params[j])
        return b

    def _stacked(self, seg, name: str, rows: np.ndarray, sides: dict[str, np.ndarray], params: list[str], *,
                 images: int = ROWS_PER_CALL) -> np.ndarray:
        """One unperturbed segment on rows [n, B, ...] fed as ``name``, stacked along the batch axis in
        chunks of whole batches (up to ``images`` images, at least one batch), each cached side tensor
        [B, ...] repeated once per row of the chunk."""
        n, bsz = rows.shape[:2]
        flat = rows.reshape(n * bsz, *rows.shape[2:])
        step = bsz if self.static_batch else max(bsz, min(images, ROWS_PER_CALL) // bsz * bsz)
        feeds = {k: self.feeds[k] for k in params}
        tiled = {k: np.concatenate([v] * min(n, step // bsz)) for k, v in sides.items()}
        out = []
        for s in range(0, len(flat), step):
            chunk = flat[s:s + step]
            out.append(seg.run(None, {name: chunk, **{k: v[:len(chunk)] for k, v in tiled.items()}, **feeds})[0])
        out = np.concatenate(out)
        return out.reshape(n, bsz, *out.shape[1:])


def pass_numbers(values: np.ndarray) -> np.ndarray:
    """For each entry, how many equal entries precede it (0 for the first of each value)."""
    order = np.argsort(values, kind="stable")
    v = values[order]
    starts = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])
    rank = np.arange(len(v)) - np.repeat(starts, np.diff(np.r_[starts, len(v)]))
    out = np.empty(len(v), dtype=np.int64)
    out[order] = rank
    return out
