"""TFLite: can a BAFFLE client use faster kernels than the built-in ones and keep exact losses?
(issue 16; docs/benchmarks.md "TFLite kernels").

Side by side in one run, per weight set (one perturbed forward of batch 32), on the same int8
.tflite and the same integers:

* ``builtin``   - the tflite-int8 runtime's path: integers written in place into the model's
                  constant buffers, built-in optimized kernels (``BUILTIN_WITHOUT_DEFAULT_DELEGATES``)
* ``reference`` - the built-in *reference* kernels (``BUILTIN_REF``), for scale
* ``xnnpack-inputs``  - the trainable tensors turned into subgraph inputs (flatbuffer rewrite),
                  XNNPACK delegate, integers fed with ``set_tensor``
* ``xnnpack-rebuild`` - the integers patched into a copy of the flatbuffer and a new XNNPACK
                  interpreter built per weight set ("re-applying weights where the delegate packs them")

A path would replace ``builtin`` only if its logits equal ``builtin``'s exactly. extra_info holds
each path's time and its largest logit difference from ``builtin``; the test asserts that the
builtin path moves with every write (the write-check) and that XNNPACK in place is refused.
"""
from __future__ import annotations

import json
import statistics
import time

import numpy as np
import pytest

from .cases import DEVICE, MODELS
from .conftest import build_artifact

BATCH = 32


def _litert():
    try:
        import flatbuffers  # noqa: F401
        from ai_edge_litert import schema_py_generated  # noqa: F401
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError as e:
        pytest.skip(f"needs ai_edge_litert with its flatbuffer schema ({e}); pip install 'baffle-edge[tflite]'")
    return Interpreter, OpResolverType


def weights_as_inputs(content: bytes, indices: list[int]) -> bytes:
    """The model with the given constant tensors turned into subgraph inputs (buffers dropped)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as S
    model = S.ModelT.InitFromObj(S.Model.GetRootAsModel(content, 0))
    g = model.subgraphs[0]
    for i in indices:
        g.tensors[i].buffer = 0
    g.inputs = list(g.inputs) + list(indices)
    b = flatbuffers.Builder(1024)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


class Paths:
    def __init__(self, bundle, threads: int):
        Interpreter, R = _litert()
        meta = json.loads((bundle / "baffle.json").read_text())
        fmt = meta["formats"]["tflite-int8"]
        self.content = (bundle / "model.int8.tflite").read_bytes()
        self.idx = [r["index"] for r in fmt["tensors"]]
        self.inp = fmt["input"]["index"]
        self.shape = [BATCH] + list(meta["input"]["shape"][1:])
        self.threads, self.Interpreter, self.R = threads, Interpreter, R
        self.builtin = self._make(bytes(bytearray(self.content)), R.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        self.reference = self._make(bytes(bytearray(self.content)), R.BUILTIN_REF)
        self.inputs = self._make(weights_as_inputs(self.content, self.idx), R.AUTO)
        scale, zp = self.builtin.get_input_details()[0]["quantization"]
        x = np.random.default_rng(0).standard_normal(self.shape).astype(np.float32)
        self.xq = np.clip(np.rint(x / scale) + zp, -128, 127).astype(np.int8)
        self.q0 = [self.builtin.get_tensor(i).copy() for i in self.idx]
        base = np.frombuffer(self.content, np.uint8).__array_interface__["data"][0]
        probe = self._make(self.content, R.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        self.offsets = []
        for i in self.idx:
            v = probe.tensor(i)()
            self.offsets.append((v.__array_interface__["data"][0] - base, v.nbytes))
            del v

    def _make(self, content, resolver):
        it = self.Interpreter(model_content=content, num_threads=self.threads, experimental_op_resolver_type=resolver)
        it.resize_tensor_input(self.inp, self.shape)
        it.allocate_tensors()
        return it

    def perturbed(self, seed: int) -> list[np.ndarray]:
        """Every integer moved by one step (+-1 for int8 weights, +-37 for int32 biases)."""
        rng = np.random.default_rng(seed)
        out = []
        for q in self.q0:
            if q.dtype == np.float32:  # float-logits head (dequantized weights): scaled instead
                out.append(q * np.float32(1.01))
                continue
            step = 1 if q.dtype == np.int8 else 37
            info = np.iinfo(q.dtype)
            out.append(np.clip(q.astype(np.int64) + step * rng.choice([-1, 1], q.shape), info.min, info.max)
                       .astype(q.dtype))
        return out

    def _out(self, it):
        it.set_tensor(self.inp, self.xq)
        it.invoke()
        return it.get_tensor(it.get_output_details()[0]["index"]).copy()

    def in_place(self, it, qs):
        for i, q in zip(self.idx, qs):
            v = it.tensor(i)()
            v[...] = q
            del v
        return self._out(it)

    def fed(self, qs):
        for i, q in zip(self.idx, qs):
            self.inputs.set_tensor(i, q)
        return self._out(self.inputs)

    def rebuilt(self, qs):
        c = bytearray(self.content)
        for (o, n), q in zip(self.offsets, qs):
            c[o:o + n] = np.ascontiguousarray(q).tobytes()
        return self._out(self._make(bytes(c), self.R.AUTO))


@pytest.mark.parametrize("case_id", [pytest.param("lenet-28", marks=DEVICE),
                                     pytest.param("wrn-10-2", marks=pytest.mark.bench_full)])
def test_tflite_kernel_paths(benchmark, sessions, bench_threads, measuring, case_id):
    case = MODELS[case_id]
    bundle = build_artifact("tflite-int8", case, sessions.workdir / "tflite-int8")  # the suites' shared export
    threads = bench_threads or 1
    p = Paths(bundle, threads)
    sets = [p.perturbed(s) for s in range(3)]
    paths = {"builtin": lambda qs: p.in_place(p.builtin, qs), "reference": lambda qs: p.in_place(p.reference, qs),
             "xnnpack-inputs": p.fed, "xnnpack-rebuild": p.rebuilt}
    ref = [paths["builtin"](qs) for qs in sets]
    assert not np.array_equal(ref[0], ref[1])  # the write-check: the builtin path sees every write
    diff = {name: max(float(np.abs(f(qs) - r).max()) for qs, r in zip(sets, ref)) for name, f in paths.items()}
    times: dict[str, list[float]] = {n: [] for n in paths}

    def round_():  # paths interleaved, so machine load hits all alike
        for name, f in paths.items():
            t0 = time.perf_counter()
            for qs in sets:
                f(qs)
            times[name].append((time.perf_counter() - t0) / len(sets))

    benchmark.group = f"tflite_paths-{case_id}"
    benchmark.pedantic(round_, rounds=5 if measuring else 1, warmup_rounds=1 if measuring else 0)
    med = {n: statistics.median(t) for n, t in times.items()}
    benchmark.extra_info.update(
        case.info(), runtime="tflite-int8", batch=BATCH, threads=threads, stage="tflite_paths",
        seconds_per_set=med, speedup_vs_builtin={n: med["builtin"] / t for n, t in med.items()},
        max_logit_diff_vs_builtin=diff, exact={n: d == 0.0 for n, d in diff.items()},
        perturbation_effect=float(np.abs(ref[0] - ref[1]).max()))
    assert diff["builtin"] == 0.0
    from baffle_edge.runtimes.tflite_runtime import TFLiteSession
    with pytest.raises(RuntimeError, match="ignores in-place weight writes"):
        TFLiteSession(bundle, delegate="xnnpack")
