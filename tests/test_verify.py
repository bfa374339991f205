"""`baffle-edge verify`: it passes a sound runtime, fails broken ones by name, and proves that every run
saw the same batches. Small schedules (a few rounds, small K) keep the whole file well under a minute."""
import dataclasses
import json
import sys
import types

import numpy as np
import pytest

from baffle_edge import verify as V
from baffle_edge.cli import main
from baffle_edge.runtimes import REGISTRY
from baffle_edge.runtimes.torch_runtime import TorchSession
from baffle_edge.simulate import Federation

TINY = ["--quick", "--rounds", "6", "--k", "10", "--clients", "3", "--eval-every", "3", "--no-progress"]
TEST_MODULE = "_verify_test_runtimes"


class CopySession(TorchSession):
    """A sound runtime under another name: identical losses to torch."""


class SignFlipSession(TorchSession):
    """Broken: reports L(w) - (L(w+d) - L(w)), i.e. the gradient with the wrong sign."""

    def losses(self, batch, task, step=0):
        out = super().losses(batch, task, step)
        return np.concatenate([out[:1], 2 * out[0] - out[1:]])


class VanishSession(TorchSession):
    """Broken: the perturbation vanishes (as a sub-step sigma does in an int8 graph): L(w+d) == L(w)."""

    def losses(self, batch, task, step=0):
        out = super().losses(batch, task, step)
        return np.full_like(out, out[0])


def _runtime(session_cls, name):
    class Runtime:
        def load(self, model, *, threads=None):
            return session_cls(model, name=name)
    Runtime.name = name
    return Runtime


@pytest.fixture
def test_runtimes(monkeypatch):
    """Register test-only runtimes (module + REGISTRY entries), undone after the test."""
    mod = types.ModuleType(f"baffle_edge.runtimes.{TEST_MODULE}")
    entries = {"torch-copy": CopySession, "broken-sign": SignFlipSession, "broken-vanish": VanishSession,
               "torch-shifted": CopySession}
    for i, (name, cls) in enumerate(entries.items()):
        setattr(mod, f"R{i}", _runtime(cls, name))
        monkeypatch.setitem(REGISTRY, name, dataclasses.replace(
            REGISTRY["torch"], name=name, module=TEST_MODULE, factory=f"R{i}", summary="test only", batched=False))
    monkeypatch.setitem(REGISTRY, "ghost-int8", dataclasses.replace(
        REGISTRY["torch"], name="ghost-int8", requires=("baffle_edge_no_such_module",), extra="ghost"))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    # "torch-shifted" is sound but reads the next round's batches: the same-batches check must see it
    orig = Federation.batches

    def batches(self, client, round_):
        return orig(self, client, round_ + (self.cfg.runtime == "torch-shifted"))
    monkeypatch.setattr(Federation, "batches", batches)
    # "torch-boom" cannot even build its federation (e.g. a failed export): an error, not a crash
    monkeypatch.setitem(REGISTRY, "torch-boom", dataclasses.replace(REGISTRY["torch"], name="torch-boom"))
    init = Federation.__init__

    def boom(self, cfg, **kw):
        if cfg.runtime == "torch-boom":
            raise RuntimeError("export failed")
        init(self, cfg, **kw)
    monkeypatch.setattr(Federation, "__init__", boom)
    return list(entries)


def test_quick_preset_passes_a_sound_runtime_and_writes_the_report(tmp_path, test_runtimes, capsys):
    out = tmp_path / "rep"
    rc = main(["verify", *TINY, "--runtimes", "torch,torch-copy", "--sweep-k", "5,20",
               "--sweep-sigma", "1e-4,1e-2", "--out", str(out)])
    assert rc == 0, capsys.readouterr()
    for f in ("verify.json", "report.md", "accuracy.png", "cosine.png", "sweep.png"):
        assert (out / f).stat().st_size > 0
    rep = json.loads((out / "verify.json").read_text())
    assert rep["passed"] and rep["failing"] == [] and rep["preset"] == "quick"
    assert set(rep["runs"]) == {"bp", "torch", "torch-copy"} and rep["parameters"] == 26_730
    assert rep["thresholds"] == {"acc_margin": 2.0, "cos_fraction": 0.8, "ref_cos_fraction": 0.5, "max_rejected": 0}
    # same batches, same order, in every run: per-round fingerprints are identical
    hashes = {n: [r["batch_hash"] for r in run["rounds"]] for n, run in rep["runs"].items()}
    assert len(hashes["bp"]) == 6 and len(set(hashes["bp"])) == 6
    assert hashes["bp"] == hashes["torch"] == hashes["torch-copy"]
    assert rep["same_batches"]["ok"]
    # the probe: backprop's decoded update is the exact gradient (clipping only rescales it)
    bp = rep["runs"]["bp"]["summary"]
    assert bp["mean_cos_clients"] == pytest.approx(1.0) and bp["mean_norm_ratio"] == pytest.approx(1.0)
    t, c = rep["runs"]["torch"]["summary"], rep["runs"]["torch-copy"]["summary"]
    assert 0.5 * rep["theory_cosine"] < t["mean_cos_clients"] < 3 * rep["theory_cosine"]
    assert c["mean_cos_clients"] == t["mean_cos_clients"] and c["final_accuracy"] == t["final_accuracy"]
    row = rep["runs"]["torch"]["rounds"][-1]
    assert {"test_accuracy", "train_loss", "cos_clients_mean", "cos_aggregate", "norm_ratio_mean"} <= set(row)
    # the sweep: more perturbations, better estimates
    k_rows = rep["sweep"]["runtimes"]["torch"]["k"]
    assert [r["k"] for r in k_rows] == [5, 20] and k_rows[1]["cos_mean"] > k_rows[0]["cos_mean"] > 0
    assert all(r["n"] == 2 and r["failed"] == 0 for r in k_rows)
    md = (out / "report.md").read_text()
    assert "| run | perturbation | final accuracy | gap to fp32 BAFFLE" in md
    assert "| torch-copy | gaussian, float |" in md
    assert "![accuracy vs round](accuracy.png)" in md and "**Result: PASS**" in md
    assert "verify: PASS" in capsys.readouterr().out


def test_broken_runtimes_fail_by_name(tmp_path, test_runtimes, capsys):
    out = tmp_path / "bad"
    rc = main(["verify", *TINY, "--no-sweep", "--out", str(out),
               "--runtimes", "torch,broken-sign,broken-vanish,torch-shifted,ghost-int8,torch-boom"])
    err = capsys.readouterr().err
    assert rc == 1
    rep = json.loads((out / "verify.json").read_text())
    assert not rep["passed"]
    assert sorted(rep["failing"]) == ["broken-sign", "broken-vanish", "ghost-int8", "torch-boom", "torch-shifted"]
    for name in rep["failing"]:
        assert f"FAIL {name}:" in err
    v = rep["verdicts"]
    assert v["torch"]["pass"]
    assert not v["broken-sign"]["checks"]["cosine"]["ok"] and v["broken-sign"]["checks"]["cosine"]["value"] < 0
    assert v["broken-vanish"]["checks"]["cosine"]["value"] == 0.0
    assert not v["torch-shifted"]["checks"]["same_batches"]["ok"] and not rep["same_batches"]["ok"]
    assert "batches differ" in " ".join(v["torch-shifted"]["reasons"])
    assert v["ghost-int8"]["status"] == "unavailable" and "baffle_edge_no_such_module" in v["ghost-int8"]["reasons"][0]
    assert v["torch-boom"]["status"] == "error" and "export failed" in v["torch-boom"]["reasons"][0]
    md = (out / "report.md").read_text()
    assert "FAIL: error: RuntimeError: export failed" in md
    assert "**Result: FAIL**" in md and "broken-sign" in md and "unavailable" in md


def test_unavailable_runtime_fails_only_when_asked_for(test_runtimes):
    assert "ghost-int8" not in V.default_runtimes() and V.default_runtimes()[0] == "torch"
    ok = {"status": "ok", "summary": {"final_accuracy": 0.9, "mean_cos_clients": 0.1, "rejected_reports": 0,
                                      "first_rejection": None}}
    runs = {"bp": ok, "torch": ok, "ghost-int8": {"status": "unavailable", "reason": "no module"}}
    batches = {"runs": {"torch": {"mismatches": 0, "pairs_checked": 3}}}
    th = V.Thresholds()
    assert V.judge(runs, batches, th, theory=0.06, explicit=False)["ghost-int8"]["pass"]
    assert not V.judge(runs, batches, th, theory=0.06, explicit=True)["ghost-int8"]["pass"]
    # thresholds are applied as documented
    worse = {"status": "ok", "summary": {**ok["summary"], "final_accuracy": 0.875, "mean_cos_clients": 0.081}}
    v = V.judge({**runs, "x": worse}, {"runs": {**batches["runs"], "x": {"mismatches": 0}}}, th, 0.06, True)["x"]
    assert v["checks"]["accuracy"]["ok"] is False and v["checks"]["cosine"]["ok"] is True
    v = V.judge({**runs, "x": worse}, {"runs": {"x": {"mismatches": 0}}},
                dataclasses.replace(th, acc_margin=3.0), 0.06, True)["x"]
    assert v["pass"]


def test_help_and_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["verify", "--help"])
    text = capsys.readouterr().out
    assert "unavailable" in text and "--acc-margin" in text and "default: 2.0" in text and "--quick" in text
    assert main(["verify", *TINY, "--runtimes", "no-such-runtime", "--out", str(tmp_path / "u")]) == 2
    assert "unknown runtime" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["verify", *TINY, "--out", str(tmp_path / "full")]) == 2
    assert main(["verify", *TINY, "--k", "0", "--out", str(tmp_path / "z")]) == 2


def test_run_names_take_an_execution_provider(tmp_path, capsys):
    """"<runtime>@<provider>[+block]": the provider is checked at the command line (usage error, exit 2)."""
    from baffle_edge.verify.check import plugin_target
    from baffle_edge.verify.config import run_parts, run_provider
    assert run_parts("onnxruntime-int8@qnn-htp+block") == ("onnxruntime-int8", "block")
    assert run_provider("onnxruntime-int8@qnn-htp") == "qnn-htp" and run_provider("torch") is None
    assert plugin_target("qnn-htp") == "qnn-htp" and plugin_target("cpu") is None
    with pytest.raises(ValueError, match="only the onnxruntime runtimes"):
        run_parts("torch@qnn-htp")
    assert main(["verify", *TINY, "--runtimes", "onnxruntime-int8@hexagon", "--out", str(tmp_path / "p")]) == 2
    assert "unknown execution provider 'hexagon'" in capsys.readouterr().err
