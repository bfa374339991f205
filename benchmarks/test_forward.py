"""Single forward latency: runtime x dtype x provider x batch x model.

One forward + softmax cross-entropy (what each of a client's K+1 forwards costs) at the model's
initial weights, on a seeded random batch; the loss must match the torch fp32 reference.
"""
from __future__ import annotations

import numpy as np
import pytest

from .cases import DEVICE, FULL, MODELS, dtype_of, runtime_params
from .conftest import forward_loss_fn, loss_tolerance, plugin_info, reference_loss

CASES = [pytest.param(m, b, id=f"{m}-b{b}", marks=[FULL] if (m in ("wrn-10-2", "mobilenet-28") and b == 128) else
                      [DEVICE] if (m, b) == ("lenet-8", 32) else [])
         for m in ("lenet-8", "lenet-28", "wrn-10-2", "mlp", "mobilenet-28") for b in (1, 32, 128)]


@pytest.mark.parametrize("case_id,batch_size", CASES)
@pytest.mark.parametrize("runtime_provider", runtime_params())
def test_forward_latency(benchmark, sessions, bench_threads, runtime_provider, case_id, batch_size):
    runtime, provider = runtime_provider
    case = MODELS[case_id]
    session = sessions.get(runtime, case, provider)
    batch = case.batch(batch_size)
    run = forward_loss_fn(session, batch)
    benchmark.group = f"forward {case_id} b{batch_size}"
    benchmark.extra_info.update(case.info(), runtime=runtime, provider=provider, dtype=dtype_of(runtime),
                                batch=batch_size, K=None, threads=bench_threads, stage="forward")
    benchmark.extra_info.update(plugin_info(session, provider))  # a plugin EP: where the graph ran, by MACs
    loss = benchmark(run)
    assert np.isfinite(loss)
    assert abs(loss - reference_loss(case, batch)) <= loss_tolerance(runtime), \
        f"{runtime} forward loss {loss} differs from the torch reference"

