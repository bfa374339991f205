"""auto-P (runtimes/batching.py): measured on the device with a short calibration, within a memory
cap, cached per (model, runtime, threads, CPU, batch). Timings here are fake: the rule is tested,
not this machine's speed (that is benchmarks/test_batched.py)."""
import json

import numpy as np
import pytest

from baffle_edge.runtimes import batching
from baffle_edge.runtimes.batching import Calibration, calibrate


@pytest.fixture(autouse=True)
def _torch_threads():
    """Sessions loaded with threads=1 set torch's global thread count: put it back for later tests
    (the torch-int8 oracle's float sums, and so its last bits, depend on it)."""
    import torch
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


class FakeDevice:
    """A clock and a memory counter driven by the calls the calibration makes: a P-set call takes
    ``cost(p)`` seconds and leaves ``base + growth * p`` bytes resident."""

    def __init__(self, cost, growth=1 << 20, base=100 << 20):
        self.cost, self.growth, self.base = cost, growth, base
        self.now, self.resident, self.ran = 0.0, base, []

    def run(self, p):
        self.ran.append(p)

        def call():
            self.now += self.cost(p)
            self.resident = max(self.resident, self.base + self.growth * p)
        return call

    def calibrate(self, **kw):
        return calibrate(self.run, timer=lambda: self.now, memory=lambda: self.resident, **kw)


def test_picks_p1_when_batching_does_not_pay():
    dev = FakeDevice(lambda p: 1e-3 * p * (1.2 if p > 1 else 1))  # a P-call costs more than P forwards
    got = dev.calibrate()
    assert got.p == 1 and "slower" in got.stopped and max(dev.ran) == 2  # stopped early
    flat = FakeDevice(lambda p: 1e-3 * p)  # exactly P forwards: no gain, so the smaller P
    assert flat.calibrate().p == 1


def test_a_p_that_cannot_be_built_here_stops_the_search():
    dev = FakeDevice(lambda p: 1e-3)

    def run(p):
        if p > 2:
            raise ImportError("No module named 'onnx'")
        return FakeDevice.run(dev, p)
    dev.run = run
    got = dev.calibrate()
    assert got.p == 2 and set(got.seconds_per_set) == {1, 2} and "onnx" in got.stopped


def test_picks_the_smallest_p_within_tolerance_of_the_best():
    dev = FakeDevice(lambda p: 1e-3 * (0.2 + 0.8 * p) if p < 10 else 1e-3 * (0.2 + 0.75 * p))
    got = dev.calibrate()
    # per set: P=5 0.84, P=10 0.77, P=25 0.758 ms: 10 is within 10% of the best (25), 5 is not
    assert got.p == 10 and set(got.seconds_per_set) == {1, 2, 5, 10, 25}


def test_never_exceeds_the_memory_cap():
    # 100 MB resident, 20 MB more per weight set: the 1.5x cap (of 120 MB) is 180 MB -> P <= 3
    dev = FakeDevice(lambda p: 1e-3 * (0.1 + 0.1 * p), growth=20 << 20)
    got = dev.calibrate()
    assert max(dev.ran) <= 2 and got.p == 2  # P=5 was predicted over the cap and never run
    assert got.over_cap == [5] and "predicted" in got.stopped
    assert all(r <= got.cap_bytes for r in got.rss_bytes.values())
    # a device whose memory grows faster than predicted: measured over the cap, not chosen
    jump = FakeDevice(lambda p: 1e-3 * (0.1 + 0.1 * p), growth=1 << 20)
    jump.run = (lambda run: lambda p: run(p) if p < 5 else _grow(jump, run(p)))(jump.run)
    got = jump.calibrate()
    assert got.p == 2 and got.over_cap == [5] and "measured" in got.stopped


def _grow(dev, call):
    def big():
        call()
        dev.resident = 10 * dev.base
    return big


def test_cache_per_key(tmp_path, monkeypatch):
    monkeypatch.setenv(batching.CACHE_ENV, str(tmp_path))
    measured = []

    def measure():
        measured.append(1)
        return Calibration(5, {1: 2.0, 5: 1.0})

    a = batching.cached_calibration("k1", measure)
    b = batching.cached_calibration("k1", measure)
    assert (a.p, a.cached, b.p, b.cached, len(measured)) == (5, False, 5, True, 1)
    assert batching.cache_path() == tmp_path / "auto-p.json"
    assert json.loads(batching.cache_path().read_text())["entries"]["k1"]["p"] == 5
    batching.cached_calibration("k2", measure)
    assert len(measured) == 2
    batching.cache_path().write_text("{not json")
    with pytest.warns(RuntimeWarning, match="ignoring the auto-P cache"):
        assert not batching.cached_calibration("k1", measure).cached
    assert batching.cached_calibration("k1", measure).cached  # rewritten


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime-int8"])
def test_session_calibrates_at_first_batch(runtime, digits, tmp_path, monkeypatch):
    """A real session with "auto": P is measured at the first batch, losses equal P = 1's, and the
    key names model, runtime, threads, CPU and batch."""
    monkeypatch.setenv(batching.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(batching, "CANDIDATES", (1, 2))
    monkeypatch.setattr(batching, "MIN_TIME_S", 0.0)
    from baffle_edge.client import Batch, run_task
    from baffle_edge.models import ModelConfig, build_model
    from baffle_edge.params import flat_params
    from baffle_edge.protocol import RoundTask
    from baffle_edge.runtimes import get_runtime
    model = build_model(ModelConfig(), seed=0)
    artifact = model
    if runtime != "torch":
        from baffle_edge.export.bundle import ExportConfig, export_bundle
        artifact = tmp_path / "bundle"
        export_bundle(model, ModelConfig(), digits, artifact, ExportConfig(formats=("onnx-int8",), calibration_samples=32))
    w, batch = flat_params(model).numpy(), Batch(digits.x_test[:16], digits.y_test[:16])
    auto = get_runtime(runtime, perturbations_per_call="auto").load(artifact, threads=1)
    assert auto.calibration is None
    task = RoundTask.for_domain(auto.domain, round=0, client=0, seed=3, k=5, sigma=1e-4)
    got = run_task(task, auto, [batch], weights=w)
    cal = auto.calibration
    assert cal is not None and not cal.cached and auto.perturbations_per_call == cal.p in (1, 2)
    for part in (f"runtime={runtime}", "threads=1", "batch=16", "lenet[", "cpu="):
        assert part in cal.key
    ref = run_task(task, get_runtime(runtime).load(artifact, threads=1), [batch], weights=w)
    np.testing.assert_allclose(got.losses, ref.losses, rtol=1e-6)
    again = get_runtime(runtime, perturbations_per_call="auto").load(artifact, threads=1)
    again.prepare(batch.x)
    assert again.calibration.cached and again.perturbations_per_call == cal.p


def test_train_reports_auto_p_in_metrics(tmp_path, monkeypatch):
    monkeypatch.setattr(batching, "CANDIDATES", (1, 2))
    from baffle_edge.simulate import TrainConfig, train
    cfg = TrainConfig(clients=2, k=4, rounds=1, eval_every=1, checkpoint_every=1, workers=1)
    metrics = train(cfg, tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())["perturbations_per_call"]
    assert saved == metrics["perturbations_per_call"]
    cal = saved["calibration"]
    assert saved["requested"] == "auto" and cal["p"] in (1, 2)
    # the second client's step re-checks a P > 1 against P = 1 (RoundWatch) and may fall back to P = 1
    # on a loaded machine: the metrics then say so, in the calibration's note and its re-check record
    fell_back = "now P=1" in cal["stopped"]
    assert saved["p"] == (1 if fell_back else cal["p"])
    assert not fell_back or (cal["p"] == 2 and cal["rechecks"])
    assert "runtime=torch" in cal["key"]
