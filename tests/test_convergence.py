"""The convergence acceptance checks (slow: about 15 minutes on 2 cores).

Run with ``python -m pytest -m slow tests/test_convergence.py``. digits, LeNet, 10 IID clients,
K = 100 isotropic noise (train's default is block noise: tests/test_blocks*.py), the reference
optimizer: BAFFLE must reach >= 85% test accuracy; the backprop baseline on the same schedule is
reported beside it (README "Results")."""
import pytest

from baffle_edge.simulate import Method, TrainConfig, train


@pytest.mark.slow
def test_baffle_reaches_85_percent_on_digits_and_bp_is_reported(tmp_path):
    cfg = TrainConfig(k=100, noise="gaussian", rounds=150, eval_every=10, checkpoint_every=1000)  # isotropic
    baffle = train(cfg, tmp_path / "baffle", progress=False)["final"]["test_accuracy"]
    bp = train(TrainConfig(method=Method.BP, rounds=150, eval_every=10, checkpoint_every=1000),
               tmp_path / "bp", progress=False)["final"]["test_accuracy"]
    print(f"\ndigits LeNet, 150 rounds: BAFFLE K=100 {100 * baffle:.1f}%, backprop {100 * bp:.1f}%")
    assert baffle >= 0.85
    assert bp >= baffle - 0.01  # the exact-gradient baseline is not worse on the same schedule


@pytest.mark.slow
def test_int8_onnxruntime_client_trains_like_fp32(tmp_path):
    """The whole int8 path: bundle export + refresh every round, +-1-step integer perturbations in
    ONNX Runtime's int8 kernels, RMS-step / leave-one-out decoding (measured 91.9%; fp32 91.4%)."""
    cfg = TrainConfig(k=100, noise="rademacher", rounds=150, eval_every=10, checkpoint_every=1000,
                      runtime="onnxruntime-int8")  # isotropic (block noise: tests/test_blocks_ort.py)
    acc = train(cfg, tmp_path / "int8", progress=False)["final"]["test_accuracy"]
    print(f"\ndigits LeNet, 150 rounds: BAFFLE through onnxruntime-int8 {100 * acc:.1f}%")
    assert acc >= 0.85
