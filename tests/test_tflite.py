"""The int8 TFLite (LiteRT) bundle and runtime: export, accuracy, in-place write parity, gradient
quality, a torch-free client, and bad inputs. One export per module (about 15 s) serves all tests."""
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("ai_edge_litert", reason="LiteRT not installed: pip install 'baffle-edge[tflite]'")
pytest.importorskip("litert_torch", reason="litert-torch not installed: pip install 'baffle-edge[tflite]'")

from baffle_edge.bundle import quantize_input, read_bundle  # noqa: E402
from baffle_edge.export.bundle import ExportConfig, calibration_set, export_bundle  # noqa: E402
from baffle_edge.export.tflite_export import export_tflite_int8, tflite_schema  # noqa: E402
from baffle_edge.runtimes import REGISTRY, get_runtime  # noqa: E402
from baffle_edge.runtimes.tflite_runtime import TFLiteSession  # noqa: E402
from conftest import exact_grad  # noqa: E402

from baffle_edge.client import Batch  # noqa: E402
from baffle_edge.estimator import (  # noqa: E402
    cosine,
    expected_cosine,
    loss_differences,
    stein_gradient,
)
from baffle_edge.models import ModelConfig, build_model  # noqa: E402
from baffle_edge.params import flat_params, layout_of, set_flat_params  # noqa: E402
from baffle_edge.protocol import Domain, RoundTask, Scheme  # noqa: E402
from baffle_edge.rows import step_noise  # noqa: E402

FMT = "tflite-int8"
ACCURACY_TOLERANCE = 1.5  # percentage points, int8 TFLite vs float torch on the digits test split


def task(k=8, scheme=Scheme.FORWARD, noise="rademacher", domain=Domain.INT8_STEP, seed=7):
    return RoundTask(round=3, client=1, seed=seed, k=k, sigma=1.0, scheme=scheme, noise=noise, domain=domain)


@pytest.fixture(scope="module")
def trained(digits):
    """LeNet (26,730 parameters) after 300 Adam steps on digits: ~97% test accuracy."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(), seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.from_numpy(digits.x_train), torch.from_numpy(digits.y_train)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(x), (32,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def bundle(trained, digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("tflite") / "bundle"
    meta = export_bundle(trained, ModelConfig(), digits, out, ExportConfig(formats=(FMT,)))
    return out, meta


@pytest.fixture(scope="module")
def session(bundle, trained):
    s = TFLiteSession(bundle[0])
    s.set_weights(flat_params(trained).numpy())
    return s


def test_registered():
    info = REGISTRY[FMT]
    assert (info.module, info.factory, info.extra, info.format, info.domain) == (
        "tflite_runtime", "TFLiteRuntime", "tflite", FMT, "int8-step")
    assert get_runtime(FMT).name == FMT


def test_export_bundle(bundle, trained):
    path, meta = bundle
    fmt = meta["formats"][FMT]
    assert fmt["files"] == {"inference": "model.int8.tflite", **{f"block_seg{i}": f"model.int8.block_seg{i}.tflite"
                                                                for i in range(3)}}  # + block segments
    assert fmt["domain"] == "int8-step"
    assert read_bundle(path).file(FMT).exists()  # sha256 verified
    table = read_bundle(path).quant_table(FMT)
    layout = layout_of(trained)
    assert [(t.name, t.shape, t.offset) for t in table.tensors] == [(s.name, s.shape, s.offset) for s in layout.specs]
    assert [t.dtype for t in table.tensors] == ["int8", "int32"] * 3
    # conv filters: torch OIHW -> TFLite OHWI; the 1-input-channel conv is depthwise (1HWO)
    perms = {r["param"]: r["permutation"] for r in fmt["tensors"]}
    assert perms["features.0.weight"] == [1, 2, 3, 0] and perms["features.4.weight"] == [0, 2, 3, 1]
    # the exported integers are exactly QuantTable.quantize(float weights) (measured: 0 differences)
    assert max(fmt["quantize_check"]["max_abs_int_diff"].values()) == 0
    ops = fmt["ops"]
    assert "CONV_2D(int8,int8,int32)->int8" in ops and "DEPTHWISE_CONV_2D(int8,int8,int32)->int8" in ops
    assert fmt["input"]["dtype"] == "int8" and fmt["output"]["dtype"] == "float32" and fmt["float_logits"]


@pytest.mark.slow  # a second export (15-40 s on a shared 2-core machine)
def test_export_deterministic(bundle, trained, digits, tmp_path):
    """A second export of the same model and calibration set gives byte-identical output."""
    calib = calibration_set(digits.x_train, 256, 0)
    export_tflite_int8(trained, calib, tmp_path / "again.tflite", layout_of(trained))
    assert (tmp_path / "again.tflite").read_bytes() == (bundle[0] / "model.int8.tflite").read_bytes()


def test_accuracy_close_to_float(session, trained, digits):
    with torch.no_grad():
        ref = (trained(torch.from_numpy(digits.x_test)).argmax(1).numpy() == digits.y_test).mean() * 100
    session._resize(len(digits.x_test))
    got = (session._logits(quantize_input(digits.x_test, session._inp)).argmax(1) == digits.y_test).mean() * 100
    assert ref > 90
    assert abs(got - ref) <= ACCURACY_TOLERANCE, (got, ref)


def _patched_model(content: bytes, rows, qs) -> bytes:
    """The .tflite with the given integers written into its constant buffers (flatbuffer surgery,
    no interpreter involved)."""
    s = tflite_schema()
    buf = bytearray(content)
    g = s.Model.GetRootAs(buf, 0)
    for row, q in zip(rows, qs):
        data = g.Buffers(g.Subgraphs(0).Tensors(row["index"]).Buffer()).DataAsNumpy()
        data[:] = np.ascontiguousarray(np.transpose(q, row["permutation"])).view(np.uint8).reshape(-1)
    return bytes(buf)


@pytest.mark.parametrize("scheme", [Scheme.FORWARD, Scheme.CENTRAL])
def test_in_place_writes_equal_patched_models(session, digits, scheme):
    """Losses from in-place writes == losses of fresh interpreters built from .tflite files whose
    weight buffers hold the same perturbed integers. Tolerance: exact (same kernels, same integers)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    t = task(k=3, scheme=scheme)
    b = Batch(digits.x_train[:32], digits.y_train[:32])
    got = session.losses(b, t)
    content = session._content
    rows, table, q = session._rows, session.table, session.q
    floats = [r["tflite_dtype"] == "float32" for r in rows]
    noise = step_noise(t, 0, table.dim)
    variants = [] if scheme is Scheme.CENTRAL else [q]
    variants += [table.perturb(q, noise(k), 1) for k in range(t.k)]
    if scheme is Scheme.CENTRAL:
        variants += [table.perturb(q, noise(k), -1) for k in range(t.k)]
    want = []
    for qs in variants:
        qs = [x.astype(np.float32) * s.astype(np.float32) if f else x
              for x, s, f in zip(qs, session._scales, floats)]
        it = Interpreter(model_content=_patched_model(content, rows, qs),
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        it.resize_tensor_input(session._inp["index"], [32, 1, 8, 8])
        it.allocate_tensors()
        it.set_tensor(session._inp["index"], quantize_input(b.x, session._inp))
        it.invoke()
        from baffle_edge.client import cross_entropy
        want.append(cross_entropy(it.get_tensor(session._out["index"]), b.y))
    np.testing.assert_array_equal(got, np.asarray(want))


def test_writes_take_effect_and_restore_exactly(session, digits):
    b = Batch(digits.x_train[32:64], digits.y_train[32:64])
    first = session.losses(b, task(k=4))
    assert np.all(first[1:] != first[0])  # every perturbation moves the loss
    again = session.losses(b, task(k=4))
    np.testing.assert_array_equal(first, again)  # original integers restored bit-exactly
    assert session.losses(b, task(k=4, seed=8))[0] == first[0]


def test_batch_resize(session, digits):
    """Batch size changes resize the interpreter; per-batch losses do not depend on history."""
    t = task(k=2)
    big = Batch(digits.x_train[:128], digits.y_train[:128])
    one = Batch(digits.x_train[:1], digits.y_train[:1])
    a = session.losses(big, t)
    session.losses(one, t)
    np.testing.assert_array_equal(session.losses(big, t), a)


def test_gradient_quality(session, trained, digits):
    """int8-step estimate at K=100 vs exact backprop at the dequantized weights (d = 26,730):
    expected cosine ~ sqrt(K / (K + d)) = 0.061; measured 0.05-0.07 (see report); assert > 0.5x."""
    k = 100
    t = task(k=k, seed=11)
    x, y = digits.x_train[700:732], digits.y_train[700:732]
    out = session.losses(Batch(x, y), t)
    table, q = session.table, session.q
    noise = step_noise(t, 0, table.dim)
    diffs = loss_differences(out[1:], out[0], t.scheme)
    g = stein_gradient(diffs, table.step(), lambda i: table.effective_noise(q, noise(i)), table.dim)
    model = build_model(ModelConfig(), seed=0)
    set_flat_params(model, torch.from_numpy(table.dequantize(q).astype(np.float32)))
    exact = exact_grad(model, x, y)
    c = cosine(g, exact)
    assert c > 0.5 * expected_cosine(k, table.dim), c


def test_client_runs_without_torch(bundle, session, digits, tmp_path):
    w = tmp_path / "w.npy"
    np.save(w, flat_params_of(session))
    np.save(tmp_path / "x.npy", digits.x_train[:32])
    np.save(tmp_path / "y.npy", digits.y_train[:32])
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        import numpy as np
        from baffle_edge.client import Batch
        from baffle_edge.protocol import RoundTask
        from baffle_edge.runtimes import get_runtime
        s = get_runtime("tflite-int8").load({str(bundle[0])!r})
        s.set_weights(np.load({str(w)!r}))
        t = RoundTask.from_json({task(k=4).to_json()!r})
        out = s.losses(Batch(np.load({str(tmp_path / 'x.npy')!r}), np.load({str(tmp_path / 'y.npy')!r})), t)
        assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
        print(repr(out.tolist()))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH")] if p))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    got = np.array(eval(r.stdout.strip().splitlines()[-1]))
    np.testing.assert_array_equal(got, session.losses(Batch(digits.x_train[:32], digits.y_train[:32]), task(k=4)))


def flat_params_of(session) -> np.ndarray:
    return session.table.dequantize(session.q).astype(np.float32)


def test_bad_inputs(bundle, session, digits, tmp_path):
    bad = tmp_path / "corrupt"
    shutil.copytree(bundle[0], bad)
    data = bytearray((bad / "model.int8.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "model.int8.tflite").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        TFLiteSession(bad)
    with pytest.raises(ValueError, match="input shape"):
        session.losses(Batch(np.zeros((4, 1, 9, 9), np.float32), np.zeros(4, np.int64)), task())
    b = Batch(digits.x_train[:8], digits.y_train[:8])
    with pytest.raises(ValueError, match="rademacher"):
        session.losses(b, task(noise="gaussian"))
    with pytest.raises(ValueError, match="domain"):
        session.losses(b, task(domain=Domain.FLOAT))
    with pytest.raises(ValueError, match="delegate"):
        TFLiteSession(bundle[0], delegate="gpu")


def test_xnnpack_refused(bundle):
    """XNNPACK packs the int8 weights at init: in-place writes would be ignored silently."""
    with pytest.raises(RuntimeError, match="ignores in-place weight writes"):
        TFLiteSession(bundle[0], delegate="xnnpack")


def test_plain_interpreter_loads_the_model_without_baffle_edge_or_torch(bundle, digits, tmp_path):
    """The .tflite is an ordinary model: LiteRT alone runs it (as an Android app would)."""
    import subprocess
    import sys
    import textwrap
    out, _ = bundle
    np.save(tmp_path / "x.npy", digits.x_test[:8])
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None; sys.modules["baffle_edge"] = None
        import numpy as np
        from ai_edge_litert.interpreter import Interpreter
        it = Interpreter(model_path={str(out / 'model.int8.tflite')!r})
        inp, outp = it.get_input_details()[0], it.get_output_details()[0]
        x = np.load({str(tmp_path / 'x.npy')!r})
        it.resize_tensor_input(inp["index"], list(x.shape)); it.allocate_tensors()
        s, z = inp["quantization"]
        xq = np.clip(np.rint(x / s) + z, -128, 127).astype(inp["dtype"]) if s else x.astype(inp["dtype"])
        it.set_tensor(inp["index"], xq); it.invoke()
        y = it.get_tensor(outp["index"])
        assert y.shape == (8, 10) and np.isfinite(y.astype(float)).all()
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
