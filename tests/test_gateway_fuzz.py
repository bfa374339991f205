"""Fuzz the gateway's HTTP API from its own OpenAPI schema (schemathesis): with and without a
valid device token, while a round is open, no request gets a 5xx and the round still closes
normally afterwards."""
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="pip install 'baffle-edge[serve]'")
schemathesis = pytest.importorskip("schemathesis", reason="pip install 'baffle-edge[test]'")
from hypothesis import HealthCheck, settings

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


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_crashes_the_gateway(case):
    for headers in ({"Authorization": f"Bearer {STATE['token']}"}, {}):
        response = case.call(headers=headers)
        assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])


def test_the_round_is_intact_after_fuzzing(gateway):
    board = STATE["board"]
    st = board.current
    assert not st.closed and set(st.tasks) == {0, 1}
    assert all(r.client == 0 for r in st.reports.values())  # only the token's own slot could ever be filled
    assert board.status()["state"] == "open"
    kinds = board.summary()["rejected_by_kind"]
    assert kinds.get("unauthenticated", 0) > 0 and kinds.get("malformed", 0) + kinds.get("invalid", 0) > 0, kinds
