"""LiteRT (TFLite) int8 runtime: K perturbed forwards of one interpreter, integers written in place.

numpy + ai_edge_litert (or tflite_runtime) only — no torch — so this is the path a device client
mirrors. The loss loop is client.step_losses; this backend's part (docs/quantized-perturbation.md):

    set_weights:  q = table.quantize(w)                    # int8 / int32, torch layout
    evaluate:     for each weight set q' (q moved by whole steps: quant.StepSelector)
                      interpreter.tensor(i)()[...] = transpose(q')   # into the model's constant buffer
                      invoke -> dequantized logits
    after losses: write q back (bit-exact restore)

The interpreter is created from a private ``bytes`` copy of the model (constant tensors point into
it; a ``model_path`` interpreter maps the file read-only and a write would crash) with the
built-in optimized kernels (``BUILTIN_WITHOUT_DEFAULT_DELEGATES``; 4.8x faster than the reference
kernels, ``BUILTIN_REF``). XNNPACK was measured faster but rounds differently from these kernels,
so its losses are never exactly this path's (docs/benchmarks.md "Target hardware"); it also packs the weights at
init and ignores later writes. ``load`` checks that a write changes the output and raises
otherwise, so a delegate that caches weights can never silently produce wrong losses.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from baffle_edge.bundle import dequantize_output, quantize_input, read_bundle
from baffle_edge.client import BaseSession, StepWeights
from baffle_edge.perturb import BlockTable
from baffle_edge.targets import check_bundle

from .tflite_incremental import TFLiteBlockForward, tflite_array

FORMAT = "tflite-int8"
DELEGATES = ("builtin", "xnnpack")


def _litert():
    """(Interpreter class, OpResolverType enum) from ai_edge_litert, else tflite_runtime."""
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter, OpResolverType  # type: ignore
        except ImportError:
            raise ImportError("runtime 'tflite-int8' needs ai_edge_litert (or tflite_runtime), which is not "
                              "importable; install it with: pip install 'baffle-edge[tflite]'") from None
    return Interpreter, OpResolverType


class TFLiteSession(StepWeights, BaseSession):
    """One interpreter of a bundle's int8 .tflite; implements ``baffle_edge.client.Session``."""

    def __init__(self, bundle_dir: str | Path, *, threads: int | None = None, delegate: str = "builtin"):
        if delegate not in DELEGATES:
            raise ValueError(f"unknown delegate {delegate!r}; known: {', '.join(DELEGATES)}")
        Interpreter, OpResolverType = _litert()
        self.bundle = read_bundle(bundle_dir)
        path = self.bundle.file(FORMAT)  # verifies the sha256 recorded in baffle.json
        self.meta = self.bundle.meta["formats"][FORMAT]
        self.table = self.bundle.quant_table(FORMAT)
        self.target = check_bundle(self.bundle.meta, FORMAT)  # warns on a CPU of another target
        self.dim = self.table.dim
        self.name = FORMAT
        self.delegate = delegate
        self._rows = self.meta["tensors"]
        if [r["param"] for r in self._rows] != [t.name for t in self.table.tensors]:
            raise ValueError(f"{path}: baffle.json 'tensors' and 'quantization' list different parameters")
        self._inp, self._out = self.meta["input"], self.meta["output"]
        # a private bytes object: the interpreter's constant tensors live in it and are written in place
        self._content = Path(path).read_bytes()
        resolver = (OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES if delegate == "builtin"
                    else OpResolverType.AUTO)
        self._make = lambda content: Interpreter(model_content=content, num_threads=threads or 1,  # noqa: E731
                                                 experimental_op_resolver_type=resolver)
        self.interp = self._make(self._content)
        self.interp.allocate_tensors()
        self._batch = int(self.interp.get_input_details()[0]["shape"][0])
        self.q: list[np.ndarray] | None = None
        self._written = None  # the weight set the interpreter holds (writes of the same set are skipped)
        self._scales = [t.broadcast(t.scale).astype(np.float32) for t in self.table.tensors]
        self._check_writes_take_effect()
        # block noise: the partition follows from the parameter table; rows run from cached activations
        # through the bundle's segment models (export/tflite_blocks.py) when the model is a chain
        self.blocks = BlockTable.from_layout(self.bundle.meta["parameters"])
        self._block_forward, self.block_forward_reason, self._block_ready = None, None, False

    @property
    def block_forward(self):
        """The incremental block forward, set up at the first block-noise task (``None``: full forwards)."""
        if not self._block_ready:
            self._block_ready = True
            self._init_block_forward()
        return self._block_forward

    @block_forward.setter
    def block_forward(self, value) -> None:
        self._block_forward, self._block_ready = value, True

    def _init_block_forward(self) -> None:
        """The segment models listed in the bundle (each checked against its sha256), or cut now from the
        verified model (bundles exported before block noise; Flower ships only baffle.json and the
        model): a listed segment missing on disk is rebuilt and must match its listed sha256. Not a
        chain: rows run as full forwards (the reason in ``block_forward_reason``)."""
        from baffle_edge.export.tflite_blocks import segment_models
        listed = self.meta.get("blocks")
        cut = None
        if listed is None or not all((self.bundle.path / self.meta["files"].get(f"block_seg{i}", "")).is_file()
                                     for i in range(len(listed["modules"]))):
            try:
                cut = segment_models(Path(self.bundle.file(FORMAT)).read_bytes(), self._rows)
            except ValueError as e:
                self.block_forward_reason = self.meta.get("blocks_unsupported") or str(e)
                return
        if listed is None:
            plan, contents, rows = cut
            listed = {**plan.to_json(), "segments": rows}
        else:
            contents = [self._segment_file(i, None if cut is None else cut[1][i]) for i in range(len(listed["modules"]))]
        self.block_forward = TFLiteBlockForward(self, listed, contents, self.blocks, self._make)

    def _segment_file(self, i: int, rebuilt: bytes | None) -> bytes:
        """Segment i's bytes: the bundle's file (sha256 checked: a corrupt one is a ValueError) or, when it
        is absent, the segment cut from the model, which must hash to the sha256 baffle.json lists."""
        role = f"block_seg{i}"
        name = self.meta["files"].get(role)
        if name is None:
            raise ValueError(f"bundle {self.bundle.path}: formats.{FORMAT}.blocks is listed but files.{role} is not")
        if (self.bundle.path / name).is_file():
            return Path(self.bundle.file(FORMAT, role)).read_bytes()
        want = self.bundle.meta["files"].get(name, {}).get("sha256")
        if hashlib.sha256(rebuilt).hexdigest() != want:
            raise ValueError(f"bundle {self.bundle.path} is missing {name}, and the segment cut from "
                             f"{self.meta['files']['inference']} does not match its sha256 in baffle.json "
                             "(re-export the bundle)")
        return rebuilt

    # ------------------------------------------------------------------ weights
    def set_integers(self, qs: list[np.ndarray]) -> None:
        """Hold the integers (set_weights: the global float weights quantized with the bundle's scales) and write them."""
        super().set_integers(qs)
        self._write(self.q)

    def _write(self, qs: list[np.ndarray]) -> None:
        if qs is self._written:
            return
        for row, q, s in zip(self._rows, qs, self._scales):
            view = self.interp.tensor(row["index"])()
            view[...] = tflite_array(row, q, s)
            del view  # invoke refuses to run while a view into internal data is alive
        self._written = qs

    def _resize(self, n: int) -> None:
        if n != self._batch:
            self.interp.resize_tensor_input(self._inp["index"], [n] + list(self.bundle.input_shape))
            self.interp.allocate_tensors()
            self._batch = n
            self._written = None
            if self.q is not None:
                self._write(self.q)

    def _logits(self, xq: np.ndarray) -> np.ndarray:
        self.interp.set_tensor(self._inp["index"], xq)
        self.interp.invoke()
        return dequantize_output(self.interp.get_tensor(self._out["index"]), self._out)

    def _check_writes_take_effect(self) -> None:
        """Write +1 step into every weight and check the output moves; write back and check the
        output returns bit-exactly. Fails under delegates that pack weights at init (XNNPACK)."""
        rng = np.random.default_rng(0)
        x = rng.standard_normal((4, *self.bundle.input_shape)).astype(np.float32)
        self._resize(len(x))
        xq = quantize_input(x, self._inp)
        q0 = [np.transpose(self.interp.get_tensor(r["index"]), np.argsort(r["permutation"])) for r in self._rows]
        q0 = [np.rint(q.astype(np.float64) / s).astype(t.dtype) if q.dtype == np.float32 else q
              for q, s, t in zip(q0, self._scales, self.table.tensors)]
        self._write(q0)  # float-head tensors now hold float32(q * scale) exactly as later writes will
        base = self._logits(xq).copy()
        # 32 steps: a bias moves by ~32 weight steps in float, above one int8 logit step too
        steps = np.full(self.dim, 32.0, dtype=np.float32)
        ignored = []
        for i, t in enumerate(self.table.tensors):  # each tensor on its own: a partial delegate is caught too
            moved = self.table.perturb(q0, steps, 1)
            self._write([m if j == i else q for j, (m, q) in enumerate(zip(moved, q0))])
            if np.array_equal(self._logits(xq), base):
                ignored.append(t.name)
        self._write(q0)
        back = self._logits(xq)
        if ignored:
            raise RuntimeError(f"TFLite delegate {self.delegate!r} ignores in-place weight writes to {ignored} (it "
                               "packed the weights when the model was loaded): perturbed losses would silently "
                               "equal the base loss. Use delegate='builtin' "
                               "(OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)")
        if not np.array_equal(back, base):
            raise RuntimeError("TFLite: writing the original integers back did not restore the output exactly")

    def restore(self) -> None:
        if self.q is not None:
            self._write(self.q)

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """The batch quantized with the int8 input's scale (the interpreter resized to its size)."""
        x = np.asarray(x, dtype=np.float32)
        self.bundle.check_batch(x)
        self._resize(len(x))
        return quantize_input(x, self._inp)

    def evaluate(self, xq: np.ndarray, sets) -> list[np.ndarray]:
        out = []
        for qs in sets:
            self._write(qs)
            out.append(self._logits(xq).copy())
        return out


class TFLiteRuntime:
    name = FORMAT

    def __init__(self, *, delegate: str = "builtin"):
        self.delegate = delegate

    def load(self, bundle_dir: str | Path, *, threads: int | None = None, delegate: str | None = None) -> TFLiteSession:
        return TFLiteSession(bundle_dir, threads=threads, delegate=delegate or self.delegate)
