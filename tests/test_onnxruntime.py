import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from baffle_edge.export.bundle import ExportConfig, export_bundle
from baffle_edge.runtimes import get_runtime
from baffle_edge.runtimes.torch_runtime import TorchSession
from bundles import trained_lenet
from conftest import exact_grad

from baffle_edge.client import Batch, run_task
from baffle_edge.estimator import cosine
from baffle_edge.models import ModelConfig
from baffle_edge.params import flat_params
from baffle_edge.protocol import RoundTask
from baffle_edge.rows import split_step, step_gradient


@pytest.fixture(scope="module")
def setup(digits, tmp_path_factory):
    model = trained_lenet(digits)
    out = tmp_path_factory.mktemp("ort") / "bundle"
    export_bundle(model, ModelConfig(), digits, out, ExportConfig(formats=("onnx", "onnx-int8")))
    return model, out, flat_params(model).numpy(), Batch(digits.x_test[:32], digits.y_test[:32])


def task(**kw):
    return RoundTask(**({"round": 2, "client": 1, "seed": 5, "k": 8, "sigma": 1e-4} | kw))


INT8 = dict(noise="rademacher", domain="int8-step")


@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_fp32_parity_with_torch(setup, scheme):
    model, out, w, batch = setup
    ref = TorchSession(model).losses(batch, task(scheme=scheme))
    s = get_runtime("onnxruntime").load(out)
    s.set_weights(w)
    got = s.losses(batch, task(scheme=scheme))
    assert got.shape == ref.shape and np.allclose(got, ref, rtol=1e-4, atol=0)
    # the loss differences carry the signal: they must agree too
    assert np.allclose(np.diff(got), np.diff(ref), atol=2e-6)


@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_int8_parity_with_the_fake_quant_oracle(setup, scheme):
    _, out, w, batch = setup
    ort8, oracle = get_runtime("onnxruntime-int8").load(out), get_runtime("torch-int8").load(out)
    for s in (ort8, oracle):
        s.set_weights(w)
    a, b = ort8.losses(batch, task(scheme=scheme, **INT8)), oracle.losses(batch, task(scheme=scheme, **INT8))
    # stated tolerance: integer kernels vs float32 fake quantization, 7-bit weights (no saturation)
    assert np.max(np.abs(a - b)) < 1e-5
    assert len(set(np.round(a, 9))) > 4  # the perturbations really change the loss


def test_int8_kernels_run_not_a_float_fallback(setup):
    _, out, w, batch = setup
    s = get_runtime("onnxruntime-int8").load(out, profile=True)
    s.set_weights(w)
    s.losses(batch, task(k=2, **INT8))
    path = Path(s.end_profiling())
    events = json.loads(path.read_text())
    path.unlink()
    ops = {e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})}
    assert {"QLinearConv", "QGemm"} <= ops, ops
    assert not ops & {"Conv", "Gemm", "FusedConv", "MatMul"}, ops


def test_int8_gradient_cosine_is_as_good_as_fp32(setup, digits):
    model, out, w, batch = setup
    ort8 = get_runtime("onnxruntime-int8").load(out)
    ort8.set_weights(w)
    table = ort8.table
    # truth: exact gradient of the float model at the dequantized weights
    import torch

    from baffle_edge.params import set_flat_params
    deq = trained_lenet(digits)
    set_flat_params(deq, torch.from_numpy(table.dequantize(ort8.q).astype(np.float32)))
    g8_true, g_true = exact_grad(deq, batch.x, batch.y), exact_grad(model, batch.x, batch.y)
    fp32 = TorchSession(model)
    c8, c32 = [], []
    for seed in range(3):
        t8 = task(k=100, client=seed, **INT8)
        base, losses = split_step(t8, ort8.losses(batch, t8))
        c8.append(cosine(step_gradient(t8, 0, losses, base, w.size, table=table, weights=w), g8_true))
        t32 = task(k=100, client=seed)
        base, losses = split_step(t32, fp32.losses(batch, t32))
        c32.append(cosine(step_gradient(t32, 0, losses, base, w.size), g_true))
    assert np.mean(c8) >= 0.8 * np.mean(c32), (c8, c32)


def test_client_runs_without_torch(setup, tmp_path):
    _, out, w, batch = setup
    t = task(k=5, **INT8)
    ref = run_task(t, get_runtime("onnxruntime-int8").load(out), [batch], weights=w)
    np.savez(tmp_path / "in.npz", w=w, x=batch.x, y=batch.y)
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        import numpy as np
        from baffle_edge.client import Batch, run_task
        from baffle_edge.protocol import RoundTask
        from baffle_edge.runtimes import get_runtime
        z = np.load({str(tmp_path / 'in.npz')!r})
        task = RoundTask.from_json({t.to_json()!r})
        r = run_task(task, get_runtime("onnxruntime-int8").load({str(out)!r}), [Batch(z["x"], z["y"])], weights=z["w"])
        print(r.to_json())
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from baffle_edge.protocol import ClientReport
    got = ClientReport.from_json(r.stdout.strip().splitlines()[-1])
    assert np.array_equal(got.losses, ref.losses) and np.array_equal(got.base_losses, ref.base_losses)


def test_bad_inputs_are_clear_errors(setup):
    _, out, w, batch = setup
    with pytest.raises(ValueError, match="known"):
        get_runtime("tensorrt")
    with pytest.raises(ValueError, match="available here"):
        get_runtime("onnxruntime-int8", provider="qnn").load(out)
    with pytest.raises(ValueError, match="known names"):
        get_runtime("onnxruntime", provider="warp-drive").load(out)
    s = get_runtime("onnxruntime-int8").load(out)
    s.set_weights(w)
    with pytest.raises(ValueError, match="rademacher"):
        s.losses(batch, task(domain="int8-step"))
    with pytest.raises(ValueError, match="domain"):
        s.losses(batch, task(noise="rademacher"))
    with pytest.raises(ValueError, match="input shape"):
        s.losses(Batch(np.zeros((4, 1, 28, 28), np.float32), batch.y[:4]), task(**INT8))
    with pytest.raises(ValueError, match="non-finite"):
        s.losses(Batch(np.full_like(batch.x, np.nan), batch.y), task(**INT8))
    f = get_runtime("onnxruntime").load(out)
    f.set_weights(np.full_like(w, 3e38))  # a runtime that returns inf/NaN logits
    with pytest.raises(ValueError, match="non-finite losses"):
        f.losses(batch, task())
    with pytest.raises(ValueError, match="weights"):
        get_runtime("onnxruntime").load(out).set_weights(w[:10])
    with pytest.raises(FileNotFoundError):
        get_runtime("onnxruntime").load(out.parent / "missing")


def test_train_through_int8_runtime_resumes_identically(tmp_path):
    from baffle_edge.simulate import TrainConfig, train
    cfg = TrainConfig(clients=3, k=6, rounds=5, eval_every=1, checkpoint_every=1, runtime="onnxruntime-int8",
                      refresh_every=2)
    full = train(cfg, tmp_path / "full", progress=False)
    assert full["final"]["rejected_reports"] == 0 and full["config"]["runtime"] == "onnxruntime-int8"
    train(cfg, tmp_path / "part", progress=False, stop_after=3)  # stops after a refresh at round 2
    resumed = train(cfg, tmp_path / "part", progress=False, resume=True)
    strip = lambda m: [{k: v for k, v in r.items() if k != "seconds"} for r in m["rounds"]]  # noqa: E731
    assert strip(full) == strip(resumed)
    with pytest.raises(ValueError, match="rademacher"):
        from baffle_edge.simulate import Federation
        Federation(dataclasses.replace(cfg, noise="gaussian"))
