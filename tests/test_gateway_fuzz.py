"""Fuzz the gateway's HTTP API from its own OpenAPI schema (schemathesis): with and without a
valid device token, while a round is open, no request gets a 5xx and the round still closes
normally afterwards.

The cases are drawn with schemathesis' strategies inside a plain hypothesis test, not through its
pytest plugin (`schema.parametrize()`), whose hooks into pytest's internals broke with pytest 9.2
(issue 21): the fuzzing then silently never ran. Here every operation must get requests, or the
test fails."""
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="pip install 'baffle-edge[serve]'")
schemathesis = pytest.importorskip("schemathesis", reason="pip install 'baffle-edge[test]'")
from hypothesis import HealthCheck, given, settings
from schemathesis.core.result import Err

from baffle_edge.gateway import tokens as tk
from baffle_edge.gateway.app import create_app
from baffle_edge.gateway.board import Board, GatewayStopped
from baffle_edge.simulate import Federation, TrainConfig

CFG = TrainConfig(clients=2, k=3, rounds=1, eval_every=1, checkpoint_every=1, workers=1, round_timeout=600.0)
STATE: dict = {}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    fed = Federation(CFG)
    board = Board(CFG, out_dir=tmp / "run", demo_data=True)
    board.bind(fed)
    token = tk.issue(tmp / "tokens.json", 0)[1]
    app = create_app(board, tk.TokenStore(tmp / "tokens.json"), rate=1e6, burst=10**6, max_poll=0.05)
    rows: list = []

    def run():
        try:
            rows.append(fed.step(0, gather=board).to_json())
        except GatewayStopped:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    while board.current is None:
        time.sleep(0.01)
    STATE.update(board=board, token=token, fed=fed)
    yield app
    board.stop("fuzzing over")
    t.join(10)


@pytest.fixture(scope="module")
def api_schema(gateway):
    return schemathesis.openapi.from_asgi("/openapi.json", gateway)


def operations(schema) -> list:
    """Every operation of the schema; one the schema cannot describe is a failure, not a skip."""
    ops = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            pytest.fail(f"schemathesis could not read an operation of the gateway's schema: {result.err()!r}")
        ops.append(result.ok())
    return ops


def test_no_request_crashes_the_gateway(api_schema):
    ops = operations(api_schema)
    assert len(ops) >= 5, [op.label for op in ops]  # task, report, weights, bundle, status, ...
    calls: dict[str, int] = {}
    for op in ops:
        calls[op.label] = 0

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=op.as_strategy())
        def fuzz(case):
            for headers in ({"Authorization": f"Bearer {STATE['token']}"}, {}):
                response = case.call(headers=headers)
                calls[op.label] += 1
                assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])

        fuzz()
    STATE["fuzz_calls"] = calls
    idle = [label for label, n in calls.items() if n == 0]
    assert not idle, f"schemathesis generated no request for {idle}: the fuzzing did not run"


def test_the_round_is_intact_after_fuzzing(gateway):
    assert sum(STATE.get("fuzz_calls", {}).values()) > 0, "the fuzz test sent no request (did it run first?)"
    board = STATE["board"]
    st = board.current
    assert not st.closed and set(st.tasks) == {0, 1}
    assert all(r.client == 0 for r in st.reports.values())  # only the token's own slot could ever be filled
    assert board.status()["state"] == "open"
    kinds = board.summary()["rejected_by_kind"]
    assert kinds.get("unauthenticated", 0) > 0 and kinds.get("malformed", 0) + kinds.get("invalid", 0) > 0, kinds
