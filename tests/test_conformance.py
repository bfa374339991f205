"""The conformance kit (baffle_edge/conformance.py) and the TypeScript client checked against it.

The kit's noise vectors must be the published ones and its Python reports must be accepted by the
server. When node and clients/js/node_modules are present (CI: `.ci/run` installs them before
pytest) the JS client runs every kit round through `node clients/js/dist/src/cli.js conformance`
the JS losses must be the Python client's float64 bits (the loss is specified: docs/noise.md
section 7), and the server must accept each JS report and decode it to the same update as the Python
client's (cosine >= 0.999999). Without node the JS test is skipped with the reason; under CI=true it fails.
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from baffle_edge import perturb
from baffle_edge.conformance import noise_vectors, write_kit
from baffle_edge.estimator import cosine
from baffle_edge.bundle import read_bundle
from baffle_edge.models import ModelConfig, build_model
from baffle_edge.protocol import ClientReport, RoundTask
from baffle_edge.server import OptimConfig, Server, make_strategy

JS = Path(__file__).resolve().parents[1] / "clients" / "js"


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    out = tmp_path_factory.mktemp("conformance") / "kit"
    index = write_kit(out, progress=False)
    return out, index


def test_noise_vectors_include_the_published_ones_and_the_edge_cases():
    v = noise_vectors()
    first = v["short"][0]
    assert first["words"][:4] == ["6627e8d5", "e169c58d", "bc57ac4c", "9b00dbd8"]
    assert first["gauss"][:2] == ["3f7dbb30", "bf6cb6b3"] and first["rad"] == "-+-+-+--"
    assert {s["seed"] for s in v["short"]} >= {2**63 + 1, 2**64 - 1, 2**53 + 1}
    assert {s["d"] for s in v["short"]} >= {0, 1, 7, 33} and any(s["k"] == 205 for s in v["short"])
    assert {(x["kind"], x["d"]) for x in v["long"]} == {(k, d) for k in ("gaussian", "rademacher") for d in (65_537, 302_778)}
    # u1 = 1: r = sqrt(-2 * ln 1) = sqrt(-0.0) = -0.0, and -0.0 * cos(t) with cos(t) < 0 is +0.0
    u = v["u1_one"]
    z = perturb.noise(u["seed"], u["round"], u["client"], u["k"], u["d"])[u["index"]:]
    assert np.all(z == 0) and [f"{b:08x}" for b in z.view(np.uint32)] == u["gauss"]


def test_kit_rounds_are_accepted_by_the_server(kit):
    out, index = kit
    assert {r["format"] for r in index["rounds"]} == {"onnx", "onnx-int8"}
    assert any(r["task"]["local_steps"] > 1 for r in index["rounds"])
    stored = json.loads((out / "conformance.json").read_text())
    assert stored["rounds"][0]["task"]["seed"] == index["rounds"][0]["task"]["seed"]
    for r in index["rounds"]:
        update = decode(out, r, ClientReport.from_json(json.dumps(r["report"])))
        assert np.all(np.isfinite(update)) and np.any(update != 0), r["name"]


def test_kit_loss_vectors_are_the_specified_loss(kit):
    from baffle_edge import libm
    from baffle_edge.client import cross_entropy
    _, index = kit
    assert index["tolerance"]["int8_losses_relative"] == 0
    v = index["loss"]["libm"]
    x = np.array([int(h, 16) for h in v["x"]], dtype=np.uint64).view(np.float64)
    assert {0x8000000000000000, 0x1, 0x7FF0000000000000} <= {int(h, 16) for h in v["x"]}  # -0.0, subnormal, inf
    assert [f"{b:016x}" for b in libm.exp(x).view(np.uint64)] == v["exp"]
    assert [f"{b:016x}" for b in libm.log(x).view(np.uint64)] == v["log"]
    for c in index["loss"]["cross_entropy"]:
        z = np.array([int(h, 16) for h in c["logits"]], dtype=np.uint32).view(np.float32).reshape(c["shape"])
        assert f"{np.float64(cross_entropy(z, np.array(c['labels']))).view(np.uint64):016x}" == c["loss"], c["what"]
    # the saturated case: every logp is +0.0, their sum +0.0, the loss -(0/2) = -0.0
    assert any(c["loss"] == "8000000000000000" for c in index["loss"]["cross_entropy"])


def test_kit_writer_refuses_to_overwrite(kit):
    with pytest.raises(FileExistsError, match="--force"):
        write_kit(kit[0], progress=False)


def test_bundle_ships_the_noise_spec(kit):
    bundle = read_bundle(kit[0] / "bundle")
    spec = bundle.meta["noise"]["spec"]
    assert (kit[0] / "bundle" / spec).read_text().startswith("# The perturbation noise")
    assert spec in bundle.meta["files"]  # its sha256 is listed like every model file
    assert set(bundle.meta["noise"]["kinds"]) == {"gaussian", "rademacher", "block"}


def test_kit_block_rounds_and_vectors(kit):
    """Block rounds in both formats (size, uniform and W > 2^32 weighted draws, FedAvg, central), run
    through the bundle's segment graphs, and the vectors a port needs beyond the draws: the block-table
    edge cases and the int8 freeze rule (q', frozen coordinates, eps_eff; an int32 bias near its bound)."""
    from baffle_edge.device import DeviceSettings, open_session
    from baffle_edge.quant import FlatSteps, QTensor, QuantTable
    out, index = kit
    block = [r for r in index["rounds"] if r["task"]["noise"] == "block"]
    assert {r["format"] for r in block} == {"onnx", "onnx-int8"}
    assert any(r["task"]["local_steps"] > 1 for r in block) and any(r["task"]["scheme"] == "central" for r in block)
    table = perturb.BlockTable.from_layout(read_bundle(out / "bundle").meta["parameters"])
    totals = [table.weighted(r["task"]["block_weights"]).draw_total for r in block if r["task"].get("block_weights")]
    assert max(totals) > 2**32 and len(table.sizes) in totals  # a W beyond 32 bits, and uniform draws (W = blocks)
    session = open_session(DeviceSettings(runtime="onnxruntime-int8", perturbations_per_call=1, threads=1), out / "bundle")
    assert session.block_forward is not None, session.block_forward_reason  # the kit's rows run through the segments
    v = index["noise"]["block"]
    assert any(d["total_weight"] > 2**32 for d in v["weighted_draws"])
    tie = next(t for t in v["tables"] if "tie" in t["what"])
    assert [b["steps"] for b in tie["blocks"]] == [3, 3, 3, 3, 2]
    assert any("error" in t for t in v["tables"])
    frozen = 0
    for c in v["freeze"]:
        t = QTensor("t", "t", 0, (len(c["q"]),), c["dtype"], 0, (1.0,) * len(c["q"]), c["multiplier"], lo=c["lo"], hi=c["hi"])
        flat = FlatSteps(QuantTable((t,)), [np.asarray(c["q"], dtype=c["dtype"])])
        idx, st = np.arange(len(c["q"])), np.asarray(c["steps"])
        for q, s, f, plus in zip(c["q"], c["steps"], c["frozen"], c["moved_plus"]):
            reach = abs(c["multiplier"] * s)  # the rule in Python integers: no overflow
            assert f == (not (c["lo"] <= q - reach and q + reach <= c["hi"])) and plus == (q if f else q + c["multiplier"] * s)
        assert list(flat.moved(idx, st, 1)) == c["moved_plus"]
        frozen += sum(c["frozen"])
    assert frozen >= 4
    bias = next(c for c in v["freeze"] if c["dtype"] == "int32")
    assert any(q + abs(37 * s) > 2**31 - 1 for q, s in zip(bias["q"], bias["steps"]))  # would overflow int32


def decode(kit_dir: Path, r: dict, report: ClientReport) -> np.ndarray:
    """What the server makes of a report: the FedSGD gradient, or the FedAvg weight change."""
    task = RoundTask.from_json(json.dumps(r["task"]))
    weights = np.fromfile(kit_dir / r["weights"], "<f4")
    opts = r["client_options"]
    fields = {f.name for f in dataclasses.fields(OptimConfig)}
    cfg = OptimConfig(**{k: v for k, v in {"clip": opts.get("clip", 0.3), "local_lr": opts.get("local_lr", 0.0),
                                           "ema_decay": None}.items() if k in fields})
    model = json.loads((kit_dir / "conformance.json").read_text()).get("model", "lenet")
    server = Server(build_model(ModelConfig(model), seed=0), make_strategy(
        "fedavg" if task.local_steps > 1 else "fedsgd", local_steps=task.local_steps), cfg)
    server.set_flat(weights)
    if r["format"] == "onnx-int8":
        server.quant_table = read_bundle(kit_dir / "bundle").quant_table("onnx-int8")
    update = server.decode(task, report)
    assert not isinstance(update, str), f"{r['name']}: server rejected the report: {update}"
    return update.gradient if update.gradient is not None else update.weights - weights


def _node_ready() -> str | None:
    """Why the JS client cannot run here, or None."""
    if shutil.which("node") is None:
        return "node is not on PATH"
    if not (JS / "node_modules" / "onnxruntime-node").is_dir():
        return "clients/js/node_modules is missing (cd clients/js && npm ci --ignore-scripts)"
    return None


def test_js_client_reports_decode_to_the_python_clients_updates(kit, tmp_path):
    why = _node_ready()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the JS client: {why}")
        pytest.skip(why)
    build = subprocess.run([str(JS / "node_modules" / ".bin" / "tsc"), "-p", str(JS / "tsconfig.json")],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    out, index = kit
    run = subprocess.run(["node", str(JS / "dist" / "src" / "cli.js"), "conformance", str(out), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    for r in index["rounds"]:
        js = ClientReport.from_json((tmp_path / f"{r['name']}.json").read_text())
        task = RoundTask.from_json(json.dumps(r["task"]))
        js.check_against(task)
        py = ClientReport.from_json(json.dumps(r["report"]))
        assert js.runtime.endswith("-js") and py.runtime == "onnxruntime-python"
        # the same logits (same ORT kernels, this CPU) and the specified loss: the same float64 bits,
        # int8 and fp32 alike (int8 must be identical on any machine, fp32 within 1e-6 across ISAs)
        for what, a, b in (("losses", js.losses, py.losses), ("base losses", js.base_losses, py.base_losses)):
            assert a.dtype == b.dtype == np.float64 and a.shape == b.shape, (r["name"], what)
            differ = np.flatnonzero(a.view(np.int64) != b.view(np.int64))
            assert differ.size == 0, f"{r['name']}: {differ.size} {what} differ from the Python client's, " \
                                     f"first {a[differ[0]]!r} vs {b[differ[0]]!r}"
        c = cosine(decode(out, r, js), decode(out, r, py))
        assert c >= 0.999999, f"{r['name']}: cosine {c}"


def test_noise_md_publishes_the_kits_long_vector_digests():
    text = (Path(__file__).resolve().parents[1] / "docs" / "noise.md").read_text()
    for v in noise_vectors()["long"]:
        assert v["sha256_f32le"] in text, (v["kind"], v["d"])


DEVICE_ONLY = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "onnx", "sklearn", "matplotlib", "scipy"):
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
from baffle_edge.kit import check_kit
results = check_kit(sys.argv[1])
assert results and all(r.ok for r in results), [(r.name, r.max_relative) for r in results]
print(len(results), sorted({m.split(".")[0] for m in sys.modules} & {"torch", "onnx", "sklearn", "matplotlib"}))
"""


def test_a_device_without_torch_or_onnx_replays_the_kit(kit):
    """The device path (baffle_edge.device via check-kit) runs on numpy + onnxruntime alone and
    reproduces every kit round: int8 bit for bit, fp32 within the kit's tolerance."""
    out = subprocess.run([sys.executable, "-c", DEVICE_ONLY, str(kit[0])], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [str(len(kit[1]["rounds"])), "[]"]


def test_check_kit_names_a_round_that_differs_and_a_broken_kit(kit, tmp_path):
    from baffle_edge.cli import main
    copy = tmp_path / "kit"
    shutil.copytree(kit[0], copy)
    index = json.loads((copy / "conformance.json").read_text())
    target = next(r for r in index["rounds"] if r["format"] == "onnx-int8")
    target["report"]["losses"][0] = float(np.nextafter(target["report"]["losses"][0], np.inf))  # one ulp
    (copy / "conformance.json").write_text(json.dumps(index))
    assert main(["check-kit", str(copy), "--round", target["name"]]) == 1
    assert main(["check-kit", str(copy), "--round", "no-such-round"]) == 2
    (copy / target["weights"]).unlink()
    assert main(["check-kit", str(copy), "--round", target["name"]]) == 2
    assert main(["check-kit", str(tmp_path / "nowhere")]) == 2


def test_kit_tolerance_per_round(kit):
    from baffle_edge.kit import round_tolerance
    _, index = kit
    tol = index["tolerance"]
    by_name = {r["name"]: r for r in index["rounds"]}
    assert round_tolerance(by_name["int8-fedavg"], tol) == 0.0  # int8: bit for bit, whatever the steps
    assert round_tolerance(by_name["fp32-forward"], tol) == 1e-6
    assert round_tolerance(by_name["fp32-fedavg"], tol) == 1e-5  # several local steps: float kernels compound
    old = {k: v for k, v in tol.items() if k != "fp32_multistep_losses_relative"}  # a kit written before the field
    assert round_tolerance(by_name["fp32-fedavg"], old) == 1e-6


def test_a_wrn_kit_has_graph_plans_and_the_device_replays_it(tmp_path):
    """``baffle-edge conformance --model wrn-10-2``: a kit whose bundle's block plan is a graph (module and
    rest segments); the Python device replays every round (int8 bit for bit) and the server accepts them."""
    from baffle_edge.cli import main
    from baffle_edge.kit import check_kit
    out = tmp_path / "wrn"
    assert main(["conformance", "--model", "wrn-10-2", "--out", str(out)]) == 0
    index = json.loads((out / "conformance.json").read_text())
    assert index["model"] == "wrn-10-2"
    meta = json.loads((out / "bundle" / "baffle.json").read_text())
    assert meta["formats"]["onnx-int8"]["blocks"]["kind"] == "graph"
    names = [r["name"] for r in index["rounds"]]
    assert {"fp32-block", "int8-block", "int8-block-central-fedavg"} <= set(names)
    uniform = next(r for r in index["rounds"] if r["name"] == "fp32-block-uniform-central")
    assert uniform["task"]["block_weights"] == [1] * len(meta["formats"]["onnx-int8"]["blocks"]["modules"])
    results = check_kit(out)
    assert [r.name for r in results] == names and all(r.ok for r in results)
    for r in index["rounds"]:
        report = ClientReport.from_json(json.dumps(r["report"]))
        assert np.all(np.isfinite(decode(out, r, report)))
    with pytest.raises(SystemExit):
        main(["conformance", "--model", "resnet", "--out", str(tmp_path / "x")])
