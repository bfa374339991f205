"""The defaults the measurements chose (README "Block noise", issue 23): block noise at the forward budget
of K+1 = 101 full forwards where the runtime has block rows, isotropic noise one option away, ``--k``
taken as asked, and runtimes without block rows on their isotropic default."""
import dataclasses
import json

import pytest

from baffle_edge.cli import build_parser
from baffle_edge.config import (DEFAULT_FORWARD_BUDGET, ISOTROPIC_K, TrainConfig, default_noise, has_block_rows,
                                run_choices)
from baffle_edge.perturb import NoiseKind
from baffle_edge.protocol import Baseline, Domain
from baffle_edge.runtimes import REGISTRY, runtime_info
from baffle_edge.train_options import config_from_args

BLOCK_RUNTIMES = ("torch", "onnxruntime", "onnxruntime-int8", "tflite-int8")


def parse(*argv: str) -> TrainConfig:
    return config_from_args(build_parser().parse_args(["train", *argv]))


@pytest.mark.parametrize("runtime", BLOCK_RUNTIMES)
def test_the_default_is_block_noise_at_the_forward_budget(runtime):
    ch = run_choices(parse("--runtime", runtime))
    assert ch.noise is NoiseKind.BLOCK and ch.forward_budget == DEFAULT_FORWARD_BUDGET == 101
    # the baseline stays the domain's: base loss for float, leave-one-out for int8 steps
    assert ch.baseline is (Baseline.LOO if ch.domain is Domain.INT8_STEP else Baseline.BASE)


@pytest.mark.parametrize("runtime, noise", [("torch", "gaussian"), ("torch", "rademacher"),
                                            ("onnxruntime-int8", "rademacher"), ("onnxruntime", "gaussian")])
def test_isotropic_noise_is_one_option_away_with_its_k_of_100(runtime, noise):
    ch = run_choices(parse("--runtime", runtime, "--noise", noise))
    assert ch.noise is NoiseKind(noise) and ch.forward_budget is None and ch.k == ISOTROPIC_K == 100


def test_k_given_with_block_noise_is_the_k_asked_for():
    ch = run_choices(parse("--k", "20"))
    assert ch.noise is NoiseKind.BLOCK and ch.forward_budget is None and ch.k == 20
    ch = run_choices(parse("--noise", "block", "--forward-budget", "11"))
    assert ch.forward_budget == 11
    with pytest.raises(ValueError, match="--noise block"):  # a budget with isotropic noise is refused, not ignored
        run_choices(parse("--noise", "gaussian", "--forward-budget", "101"))
    with pytest.raises(ValueError, match="--k"):
        parse("--k", "0")


def test_runtimes_and_models_without_block_rows_keep_their_isotropic_default():
    torch_int8 = runtime_info("torch-int8")  # the int8 oracle runs rows as full forwards
    assert not has_block_rows(torch_int8, "lenet") and default_noise(torch_int8, "lenet") is NoiseKind.RADEMACHER
    assert run_choices(TrainConfig(runtime="torch-int8")).noise is NoiseKind.RADEMACHER
    for model in ("mlp", "mobilenet"):  # torch's incremental forwards are LeNet's and WideResNet's
        assert run_choices(TrainConfig(model=model)).noise is NoiseKind.GAUSSIAN
    assert run_choices(TrainConfig(model="wrn-10-2")).noise is NoiseKind.BLOCK  # runtimes/torch_residual.py
    assert run_choices(TrainConfig(model="mlp", runtime="onnxruntime")).noise is NoiseKind.BLOCK  # ORT chains
    assert run_choices(TrainConfig(norm="group")).noise is NoiseKind.GAUSSIAN  # GroupNorm couples channels
    for runtime in ("onnxruntime", "onnxruntime-int8"):  # ORT's graph segments (export/graph_blocks.py)
        assert run_choices(TrainConfig(model="wrn-10-2", runtime=runtime)).noise is NoiseKind.BLOCK
    assert run_choices(TrainConfig(model="wrn-10-2", runtime="tflite-int8")).noise is NoiseKind.RADEMACHER  # chains only
    assert run_choices(TrainConfig(norm="group", runtime="onnxruntime")).noise is NoiseKind.GAUSSIAN  # not measured
    for name, info in REGISTRY.items():  # every registered runtime resolves to a noise its domain accepts
        ch = run_choices(TrainConfig(runtime=name))
        assert (ch.noise is NoiseKind.BLOCK) == has_block_rows(info, "lenet"), name


def test_the_default_federation_spends_the_budget_as_equal_compute_k():
    """K of the default torch run is runtimes/torch_incremental.equal_compute_k at 101 (6,058 on digits)."""
    from baffle_edge.runtimes.torch_incremental import equal_compute_k
    from baffle_edge.simulate import Federation
    fed = Federation(TrainConfig(clients=2))
    mc = fed.model_cfg
    assert fed.noise is NoiseKind.BLOCK and fed.forward_budget == 101
    assert fed.k == equal_compute_k(fed.model, mc.image_size, 101, mc.in_channels, rule="delta") == 6058
    assert fed.k_bound == fed.k  # the size draw keeps K fixed
    adaptive = Federation(TrainConfig(clients=2, block_draw="adaptive"))
    assert adaptive.k_bound == 4 * fed.k  # the gateway's report limit covers the adaptive draw's cap
    assert Federation(TrainConfig(clients=2, k=20)).k == 20
    iso = Federation(TrainConfig(clients=2, noise="gaussian"))
    assert iso.k == iso.k_bound == 100 and iso.forward_budget is None


def test_gateway_report_limit_fits_a_default_block_report():
    """serve's default run: a JSON block report of K = 6,058 losses is accepted, not refused as too large."""
    import numpy as np

    from baffle_edge.gateway.app import report_limit
    from baffle_edge.protocol import ClientReport
    cfg = TrainConfig()
    k = 6058
    report = ClientReport(round=0, client=0, losses=np.full(k, 2.3025850929940457), num_samples=32,
                          base_losses=np.array([2.302585092994046]), model_version="0" * 16, runtime="torch")
    body = json.dumps(report.to_dict()).encode()
    assert len(body) <= report_limit(cfg, k) and report_limit(cfg) < len(body)  # K=100 would refuse it


def test_a_run_without_block_rows_trains_with_isotropic_noise(tmp_path):
    from baffle_edge.simulate import train
    cfg = TrainConfig(model="mlp", clients=2, rounds=2, eval_every=1, checkpoint_every=2, k=4)
    m = train(cfg, tmp_path / "mlp", progress=False)
    assert m["estimator"] == {"noise": "gaussian", "k": 4, "forward_budget": None, "baseline": "base"}
    assert m["final"]["rounds_done"] == 2 and m["final"]["rejected_reports"] == 0


def test_help_says_what_the_default_is():
    p = build_parser()
    sub = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction").choices["train"]
    h = " ".join(sub.format_help().split())
    assert "default: block" in h and "--noise gaussian / rademacher" in h and "96.4%" in h
    assert dataclasses.replace(TrainConfig(), noise="gaussian").noise is NoiseKind.GAUSSIAN


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime-int8"])
def test_the_default_run_is_the_measured_block_run(runtime):
    """`baffle-edge train` asks exactly the tasks of the measured `--noise block --forward-budget 101`
    run (README "Results": 96.4% torch, 95.3% ORT int8 at 150 rounds), so the figures are the default's."""
    from baffle_edge.simulate import Federation
    default = Federation(parse("--runtime", runtime, "--clients", "2"))
    explicit = Federation(parse("--runtime", runtime, "--clients", "2", "--noise", "block", "--forward-budget", "101"))
    assert default.k == explicit.k == {"torch": 6058, "onnxruntime-int8": 3309}[runtime]
    for r, c in ((0, 0), (7, 1)):
        assert default.task(r, c).to_json() == explicit.task(r, c).to_json()


def test_resume_compares_what_ran_and_reads_checkpoints_from_before_the_block_default(tmp_path):
    """A checkpoint whose config left noise open (written before block noise became the default) ran
    isotropic noise: resuming it asks for ``--noise gaussian``, not silently block noise."""
    import torch

    from baffle_edge.simulate import train
    small = dict(clients=2, rounds=2, eval_every=1, checkpoint_every=1, workers=1)
    out = tmp_path / "old"
    train(TrainConfig(noise="gaussian", k=4, **small), out, progress=False, stop_after=1)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    old = json.loads(state["config"])
    old["noise"] = None  # as the previous default wrote it
    state["config"] = json.dumps(old)
    del state["estimator"]
    torch.save(state, out / "checkpoint.pt")
    with pytest.raises(ValueError, match="gaussian noise"):
        train(TrainConfig(k=4, **small), out, progress=False, resume=True)  # would be block noise now
    m = train(TrainConfig(noise="gaussian", k=4, **small), out, progress=False, resume=True)
    assert m["final"]["rounds_done"] == 2
    out2 = tmp_path / "new"  # a new checkpoint: the default resumes as the default, K from the budget
    train(TrainConfig(**small), out2, progress=False, stop_after=1)
    assert train(TrainConfig(**small), out2, progress=False, resume=True)["estimator"]["noise"] == "block"
    with pytest.raises(ValueError, match="noise"):
        train(TrainConfig(noise="gaussian", **small), out2, progress=False, resume=True)
