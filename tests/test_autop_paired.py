"""auto-P's paired calibration (issue 28): every P-call is timed right after a P = 1 call, and P > 1
is chosen only when its gain is outside the noise. Fake clocks: the rule is tested, not the machine."""
import pytest

from baffle_edge.runtimes.batching import Calibration, calibrate, choose


class LoadedDevice:
    """A P-set call costs ``per_set(p) * p`` seconds times the machine's load at that moment;
    ``load(i)`` gives the load of the i-th call (any call: P = 1 or P)."""

    def __init__(self, per_set, load):
        self.per_set, self.load, self.now, self.calls = per_set, load, 0.0, 0

    def run(self, p):
        def call():
            self.now += self.per_set(p) * p * self.load(self.calls)
            self.calls += 1
        return call

    def calibrate(self, **kw):
        return calibrate(self.run, timer=lambda: self.now, memory=lambda: 0, **kw)


def test_a_load_spike_during_p1_does_not_make_batching_look_faster():
    # batching does not pay (same per-set cost), but the machine was 3x loaded while P = 1 was
    # timed alone: the unpaired rule saw P = 2..25 as 3x faster; paired calls see through it
    dev = LoadedDevice(lambda p: 1e-3, lambda i: 3.0 if i < 8 else 1.0)
    got = dev.calibrate()
    assert got.p == 1, got.to_json()
    assert all(s == pytest.approx(1.0) for s in got.speedup.values())


def test_a_real_gain_survives_a_moving_load():
    # the machine gets steadily busier (3x by the end): later, larger P look slower when timed alone
    dev = LoadedDevice(lambda p: 1e-3 if p == 1 else 0.5e-3, lambda i: 1.0 + i / 20)
    got = dev.calibrate()
    assert got.p == 2 and got.speedup[2] >= 1.5  # 2x per set; smallest P within 10% of the best


def test_gain_within_noise_falls_back_to_p1():
    noise = [1.0, 1.6, 1.0, 0.7, 1.0, 1.5, 1.0, 0.8] * 20  # big jitter, a 12% mean gain for P = 5
    dev = LoadedDevice(lambda p: 1e-3 if p == 1 else 0.88e-3, lambda i: noise[i % len(noise)])
    got = dev.calibrate(candidates=(1, 5))
    assert got.speedup_low[5] <= 1.0 and got.p == 1, got.to_json()


def test_choose_rule():
    cal = Calibration(1, speedup={2: 1.05, 5: 1.5, 10: 1.6}, speedup_low={2: 1.01, 5: 1.2, 10: 0.9})
    assert choose(cal) == 5  # 10 is faster on median but its lower quartile shows no gain
    assert choose(Calibration(1, speedup={2: 1.09}, speedup_low={2: 1.05})) == 1  # below 1 + tolerance
    assert choose(Calibration(1)) == 1


def test_json_round_trip_keeps_the_speedups():
    cal = Calibration(5, {1: 2e-3, 5: 1e-3}, speedup={5: 2.0}, speedup_low={5: 1.8})
    back = Calibration.from_json(cal.to_json())
    assert (back.p, back.speedup, back.speedup_low) == (5, {5: 2.0}, {5: 1.8})
    assert Calibration.from_json({"p": 2}).speedup == {}  # entries written before the pairs: still read


class FakeSession:
    """An AutoP session on a fake clock: a P-set call costs ``cost[p]`` seconds (changeable)."""

    def __init__(self, monkeypatch, cost):
        from baffle_edge.runtimes import batching
        self.cost, self.now = cost, 0.0
        monkeypatch.setattr(batching.time, "perf_counter", lambda: self.now)

        class S(batching.AutoP):
            name = "fake"
            perturbations_per_call = 1

            def use_p(s, p):
                s.perturbations_per_call = p

            def weight_set(s, sign, eps, task):
                return "w0"

            def evaluate(s, x, sets):
                self.now += self.cost[s.perturbations_per_call] * (len(sets) / s.perturbations_per_call)
                return [0.0] * len(sets)

            def evaluate_sequential(s, x, sets):
                self.now += self.cost[1] * len(sets)
                return [0.0] * len(sets)
        self.session = S()


def test_recheck_falls_back_when_the_load_moves(monkeypatch):
    from baffle_edge.runtimes.batching import RECHECK_ROUNDS, RoundWatch
    fake = FakeSession(monkeypatch, {1: 1e-3, 5: 2e-3})  # P = 5: 2.5x per set
    s = fake.session
    s.use_p(5)
    s.calibration = Calibration(5, speedup={5: 2.5}, speedup_low={5: 2.4})
    s._auto_watch = RoundWatch()
    s._calibrate_once("x")  # no re-check pending before the first step ran
    assert s.perturbations_per_call == 5 and not s._auto_watch.checks
    s._auto_watch.observe(1e-3)
    assert s._auto_watch.pending  # the first steps re-check
    s._calibrate_once("x")
    assert s.perturbations_per_call == 5 and s._auto_watch.checks[-1]["speedup"] == pytest.approx(2.5)
    for _ in range(RECHECK_ROUNDS):
        s._auto_watch.observe(1e-3)
        if s._auto_watch.pending:
            s._calibrate_once("x")
    assert not s._auto_watch.pending  # steady time per row: no more re-checks
    fake.cost[5] = 6e-3  # the batched call got slower (load): P = 5 now loses to P = 1
    s._auto_watch.observe(2e-3)  # a step's time per row drifted by 100%
    assert s._auto_watch.pending
    s._calibrate_once("x")
    assert s.perturbations_per_call == 1 and s._auto_watch is None
    assert "re-check" in s.calibration.stopped and s.calibration.rechecks[-1]["speedup"] < 1


def test_recheck_keeps_p_when_the_drift_is_everyones(monkeypatch):
    from baffle_edge.runtimes.batching import RoundWatch
    fake = FakeSession(monkeypatch, {1: 1e-3, 5: 2e-3})
    s = fake.session
    s.use_p(5)
    s.calibration = Calibration(5, speedup={5: 2.5}, speedup_low={5: 2.4}, cached=True)
    s._auto_watch = RoundWatch(pending=True)  # a cached choice re-checks at the first step
    fake.cost.update({1: 3e-3, 5: 6e-3})  # everything 3x slower: the gain holds
    s._calibrate_once("x")
    assert s.perturbations_per_call == 5 and s.calibration.rechecks
