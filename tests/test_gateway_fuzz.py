"""Fuzz the gateway's HTTP API from its own OpenAPI schema (schemathesis): with and without a
valid device token, while a round is open, no request gets a 5xx, every 4xx carries the documented
body ``{"error", "reason"}`` and is counted by the board (one count per refused request), and the
round still closes normally afterwards. Schema-valid (positive) and schema-violating (negative)
cases are drawn for every operation, plus explicit report bodies that once ended in a 500 or went
uncounted (issue 26: null and huge loss elements, an NPZ "version needed" byte of 64 or 255, an
aborted upload, unknown routes).

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
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.result import Err

from baffle_edge.gateway import tokens as tk
from baffle_edge.gateway.app import create_app
from baffle_edge.gateway.board import Board, GatewayStopped
from baffle_edge.protocol import ClientReport
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


def refused_total() -> int:
    return sum(STATE["board"].rejected_by_kind.values())


def check_answer(response, what) -> int:
    """No 5xx; a 4xx has the documented error body. Returns 1 for a refusal (the board must count it)."""
    assert response.status_code < 500, (what, response.status_code, response.text[:300])
    if response.status_code < 400:
        return 0
    body = response.json()
    assert set(body) == {"error", "reason"} and body["error"] and body["reason"], (what, response.status_code, body)
    return 1


def test_no_request_crashes_the_gateway(api_schema):
    ops = operations(api_schema)
    assert len(ops) >= 5, [op.label for op in ops]  # task, report, weights, bundle, status, ...
    calls: dict[str, int] = {}
    for op in ops:
        for mode in GenerationMode:
            label = f"{op.label} ({mode.value})"
            calls[label] = 0

            @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(case=op.as_strategy(generation_mode=mode))
            def fuzz(case):
                for headers in ({"Authorization": f"Bearer {STATE['token']}"}, {}):
                    before = refused_total()
                    response = case.call(headers=headers)
                    calls[label] += 1  # noqa: B023 - fuzz() runs within this iteration
                    refusals = check_answer(response, (case.method, case.path))
                    assert refused_total() - before == refusals, (case.method, case.path, response.status_code)

            try:
                fuzz()
            except Unsatisfiable:  # no parameter or body to violate (e.g. /v1/status): nothing negative to send
                assert mode is GenerationMode.NEGATIVE and calls[label] == 0, label
    STATE["fuzz_calls"] = calls
    idle = [label for label, n in calls.items() if n == 0 and "positive" in label]
    assert not idle, f"schemathesis generated no request for {idle}: the fuzzing did not run"
    negative = {label: n for label, n in calls.items() if "negative" in label and n}
    assert any("/v1/report" in label for label in negative), f"no schema-violating report was sent: {calls}"


def report_bodies(good: dict) -> list[tuple[str, bytes]]:
    """Report bodies that once gave a 500 (issue 26, F3 and F4), and some neighbours."""
    import json
    bodies = []
    for field in ("losses", "base_losses"):
        for bad in ([None, {}], [None, 2**1100], [{}, None], [2**1100], [[1.0]], [True], ["1"]):
            bodies.append(("application/json", json.dumps({**good, field: bad}).encode()))
    npz = bytearray(ClientReport.from_dict({**good}).to_npz())
    for byte in (64, 255, 0):
        patched = bytearray(npz)
        at = patched.find(b"PK\x01\x02")
        while at >= 0:
            patched[at + 6] = byte
            at = patched.find(b"PK\x01\x02", at + 4)
        bodies.append(("application/x-npz", bytes(patched)))
    bodies.append(("application/x-npz", bytes(npz[: len(npz) // 2])))  # truncated
    return bodies


def test_explicit_hostile_requests_are_refused_and_counted(gateway):
    from starlette.testclient import TestClient
    board, token = STATE["board"], STATE["token"]
    task = board.current.tasks[1]  # client 1's task: the token answers for client 0, so nothing is accepted
    good = ClientReport(round=task.round, client=task.client, losses=[2.3] * (task.local_steps * task.losses_per_step),
                        base_losses=[2.3] * task.local_steps, num_samples=32, model_version=task.model_version).to_dict()
    auth = {"Authorization": f"Bearer {token}"}
    with TestClient(gateway, raise_server_exceptions=True) as http:
        for media, body in report_bodies(good):
            before = refused_total()
            r = http.post("/v1/report", content=body, headers={**auth, "Content-Type": media})
            assert check_answer(r, (media, body[:60])) == 1 and refused_total() - before == 1
        for method, path in (("GET", "/v1/nothing"), ("DELETE", "/v1/report"), ("GET", "/v1/weights/" + "f" * 16),
                             ("GET", "/v1/bundle/12345/baffle.json"), ("GET", "/v1/data/99"), ("PUT", "/")):
            before = refused_total()
            r = http.request(method, path, headers=auth)
            assert check_answer(r, (method, path)) == 1 and refused_total() - before == 1
    STATE["explicit"] = True


def test_the_round_is_intact_after_fuzzing(gateway):
    assert sum(STATE.get("fuzz_calls", {}).values()) > 0, "the fuzz test sent no request (did it run first?)"
    board = STATE["board"]
    st = board.current
    assert not st.closed and set(st.tasks) == {0, 1}
    assert all(r.client == 0 for r in st.reports.values())  # only the token's own slot could ever be filled
    assert board.status()["state"] == "open"
    kinds = board.summary()["rejected_by_kind"]
    assert kinds.get("unauthenticated", 0) > 0 and kinds.get("malformed", 0) + kinds.get("invalid", 0) > 0, kinds
