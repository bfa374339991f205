import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from baffle_edge.bundle import read_bundle, sha256
from baffle_edge.cli import main
from baffle_edge.export.bundle import ExportConfig, export_bundle
from baffle_edge.models import ModelConfig
from baffle_edge.params import layout_of
from bundles import accuracy_of, trained_lenet


@pytest.fixture(scope="module")
def model(digits):
    return trained_lenet(digits)


@pytest.fixture(scope="module")
def bundle(model, digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "bundle"
    meta = export_bundle(model, ModelConfig(), digits, out, ExportConfig(formats=("onnx", "onnx-int8", "ort")))
    return out, meta


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_bundle_files_and_metadata(bundle, model):
    out, meta = bundle
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.train.onnx", "model.int8.onnx", "model.int8.train.onnx", "model.int8.ort",
            "model.int8.required_operators.config", "baffle.json", "README.md"} <= names
    saved = json.loads((out / "baffle.json").read_text())
    assert saved["schema_version"] == 1 and saved["model"]["parameters"] == 26_730
    assert saved["parameters"] == layout_of(model).to_json()
    for name, info in saved["files"].items():
        assert sha256(out / name) == info["sha256"] and (out / name).stat().st_size == info["bytes"]
    q = saved["formats"]["onnx-int8"]["quantization"]
    assert [r["name"] for r in q] == [p["name"] for p in saved["parameters"]]
    assert {r["dtype"] for r in q} == {"int8", "int32"}
    assert saved["input"]["name"] == "input" and saved["output"]["name"] == "logits"
    assert saved["noise"]["generator"] == "philox4x32-10"
    readme = (out / "README.md").read_text()
    assert "OrtSession" in readme and "`input`" in readme and "`logits`" in readme


def test_float_onnx_matches_torch(bundle, model, digits):
    out, _ = bundle
    proto = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version >= 17
    x = digits.x_test[:64]
    diff = np.abs(session(out / "model.onnx").run(None, {"input": x})[0] - model(torch.from_numpy(x)).detach().numpy())
    assert diff.max() <= 1e-4


def test_int8_accuracy_within_one_point_of_float(bundle, model, digits):
    out, _ = bundle
    acc_float = accuracy_of(lambda x: model(torch.from_numpy(x)).detach().numpy(), digits.x_test, digits.y_test)
    s = session(out / "model.int8.onnx")
    acc_int8 = accuracy_of(lambda x: s.run(None, {"input": x})[0], digits.x_test, digits.y_test)
    assert acc_float > 0.85
    assert abs(acc_int8 - acc_float) <= 0.01, (acc_float, acc_int8)


def test_train_variants_equal_plain_graphs(bundle, model, digits):
    out, meta = bundle
    b = read_bundle(out)
    x = digits.x_test[:32]
    weights = {n: p.detach().numpy() for n, p in model.named_parameters()}
    plain = session(out / "model.onnx").run(None, {"input": x})[0]
    # float: same values up to kernel choice (constant weights are pre-packed differently)
    assert np.allclose(session(b.file("onnx", "train")).run(None, {"input": x, **weights})[0], plain, atol=1e-5)
    table = b.quant_table("onnx-int8")
    flat = np.concatenate([w.reshape(-1) for w in weights.values()])
    feeds = {t.input: q for t, q in zip(table.tensors, table.quantize(flat))}
    int8_plain = session(out / "model.int8.onnx").run(None, {"input": x})[0]
    assert np.array_equal(session(b.file("onnx-int8", "train")).run(None, {"input": x, **feeds})[0], int8_plain)


def test_quant_table_reproduces_the_exported_integers(bundle, model):
    out, _ = bundle
    proto = onnx.load(str(out / "model.int8.onnx"))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    table = read_bundle(out).quant_table("onnx-int8")
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    for t, q in zip(table.tensors, table.quantize(flat)):
        assert np.array_equal(q, inits[t.input]), t.name


def test_artifacts_load_without_baffle_edge_or_torch(bundle, digits):
    out, _ = bundle
    np.save(out.parent / "x.npy", digits.x_test[:8])
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None; sys.modules["baffle_edge"] = None
        import json, numpy as np, onnxruntime as ort
        out = {str(out)!r}
        x = np.load({str(out.parent / 'x.npy')!r})
        meta = json.load(open(out + "/baffle.json"))
        for f in ("model.onnx", "model.int8.onnx", "model.int8.ort"):
            s = ort.InferenceSession(out + "/" + f, providers=["CPUExecutionProvider"])
            y = s.run([meta["output"]["name"]], {{meta["input"]["name"]: x}})[0]
            assert y.shape == (8, 10) and np.isfinite(y).all(), f
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_export_is_deterministic(model, digits, tmp_path):
    cfg = ExportConfig(formats=("onnx", "onnx-int8"))
    export_bundle(model, ModelConfig(), digits, tmp_path / "a", cfg)
    export_bundle(model, ModelConfig(), digits, tmp_path / "b", cfg)
    for p in (tmp_path / "a").iterdir():
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes(), p.name


def test_cli_export_from_checkpoint_and_bad_inputs(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--rounds", "1", "--clients", "2", "--k", "2", "--out", str(run), "--no-progress"]) == 0
    out = tmp_path / "bundle"
    assert main(["export", "--checkpoint", str(run / "checkpoint.pt"), "--formats", "onnx-int8",
                 "--out", str(out)]) == 0
    assert (out / "model.int8.train.onnx").exists() and "round 1" in read_bundle(out).meta["source"]
    capsys.readouterr()
    # existing folder without --force, unknown format, corrupt / truncated checkpoint
    assert main(["export", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", "--formats", "onnx,coreml", "--out", str(tmp_path / "x")]) == 2
    assert "unknown format" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes((run / "checkpoint.pt").read_bytes()[:500])
    assert main(["export", "--checkpoint", str(bad), "--out", str(tmp_path / "y")]) == 2
    assert "checkpoint" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "z")]) == 2
    assert not any(p.name.startswith(".") or p.name in ("x", "y", "z") for p in tmp_path.iterdir())


def test_batchnorm_model_and_missing_converter_fail_cleanly(digits, tmp_path, monkeypatch):
    bn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                             torch.nn.Linear(144, 10))
    with pytest.raises(ValueError, match="BatchNorm"):
        export_bundle(bn, ModelConfig(), digits, tmp_path / "bn")
    monkeypatch.setitem(sys.modules, "litert_torch", None)
    from baffle_edge.models import build_model
    with pytest.raises(ImportError, match=r"baffle-edge\[tflite\]"):
        export_bundle(build_model(ModelConfig()), ModelConfig(), digits, tmp_path / "t",
                      ExportConfig(formats=("tflite-int8",)))
    assert not (tmp_path / "t").exists() and not list(tmp_path.glob(".t.*"))


def test_tampered_bundle_is_refused(bundle, tmp_path):
    import shutil
    out, _ = bundle
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    data = bytearray((copy / "model.int8.train.onnx").read_bytes())
    data[-10] ^= 0xFF
    (copy / "model.int8.train.onnx").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        read_bundle(copy).file("onnx-int8")
    (copy / "model.train.onnx").unlink()
    with pytest.raises(FileNotFoundError):
        read_bundle(copy).file("onnx")
    (copy / "baffle.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        read_bundle(copy)
