"""The operator's view of a served run (issue 27): /v1/status's progress, slots and finished rounds,
the absent devices' likely causes (logged once per cause per round, while the round is open), the
live page, and `serve --web DIR` refusing a page whose modules were never built."""
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="pip install 'baffle-edge[serve]'")

from test_gateway import CFG, Live

from baffle_edge.cli import main as cli
from baffle_edge.gateway import tokens as tk
from baffle_edge.gateway.page import check_web_dir, stale_web_build

REPO = Path(__file__).resolve().parents[1]


def wait_for(predicate, seconds: float = 10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not true within {seconds} s")


@pytest.fixture
def watched(tmp_path, request):
    cfg, demo = request.param if hasattr(request, "param") else (CFG, True)
    lv = Live(tmp_path, cfg)
    lv.board.demo_data = demo
    lv.board.watch.facts = dataclasses.replace(lv.board.watch.facts, demo_data=demo)
    lv.logs = []
    lv.board.watch.log = lv.logs.append
    yield lv
    lv.close()


def causes(status: dict) -> dict:
    return {n["cause"]: n for n in status["notices"]}


@pytest.mark.parametrize("watched", [(dataclasses.replace(CFG, round_timeout=12.0), True)], indirect=True)
def test_status_shows_progress_slots_silent_devices_and_finished_rounds(watched):
    lv = watched
    t = lv.open(0)
    assert lv.post(0, lv.report(0)).status_code == 202
    assert lv.offer(1)["status"] == "task"  # client 1 takes its task and never answers; 2 and 3 never poll
    s = lv.http.get("/v1/status").json()
    assert (s["state"], s["round"], s["rounds"], s["eval_every"], s["round_timeout"]) == ("open", 1, 3, 1, 12.0)
    assert s["slots"] == {"reported": 1, "working": 1, "not_fetched": 2}
    assert 0 < s["round_seconds"] < 6 and s["notices"] == [] and s["history"] == []
    # after the grace (half the timeout, at most 30 s) and before the round closes: one notice per cause
    s = wait_for(lambda: (st := lv.http.get("/v1/status").json()) and len(st["notices"]) >= 2 and st)
    assert s["state"] == "open", "the causes must be known while the round is open"
    time.sleep(1.5)  # more checks of the open round: no second line per cause
    lv.close_round_now()
    got = causes(s)
    assert got["no-report"]["clients"] == [1] and got["never-fetched"]["clients"] == [2, 3]
    assert "took the task and sent no report" in got["no-report"]["message"]
    assert "runtime torch exports no bundle" in got["no-report"]["message"]  # the hint for JS devices
    assert "never fetched the task" in got["never-fetched"]["message"] and "own token" in got["never-fetched"]["message"]
    t.join(10)
    assert sorted(lv.logs) == sorted(f"round 1: {n['message']}" for n in s["notices"])  # once per cause per round
    lv.board.round_done({**lv.rows[0], **lv.fed.evaluate()})  # what simulate.train's on_round hands over
    s = lv.http.get("/v1/status").json()
    (row,) = s["history"]
    assert row["round"] == 1 and row["clients_accepted"] == 1 and row["absent"] == 3 and row["bytes_up"] > 0
    assert 0 <= row["test_accuracy"] <= 1 and row["test_loss"] > 0
    assert lv.http.get("/v1/status?since=1").json()["history"] == []
    text = json.dumps(s)
    assert "client-" not in text and str(lv.board.out_dir) not in text  # no device names, no server paths
    assert lv.http.get("/v1/status?since=-1").status_code == 422


@pytest.mark.parametrize("watched", [(dataclasses.replace(CFG, round_timeout=60.0), False)], indirect=True)
def test_refused_requests_name_their_cause_at_once(watched):
    lv = watched
    lv.open(0)
    assert lv.http.get("/v1/data/0", headers=lv.auth(2)).json()["error"] == "no-demo-data"
    assert lv.http.get("/v1/bundle/7/model.onnx", headers=lv.auth(3)).json()["error"] == "unknown-bundle"
    assert lv.http.get("/v1/task", headers={"Authorization": "Bearer {\"devices\": []}"}).status_code == 401
    s = wait_for(lambda: (st := lv.http.get("/v1/status").json()) and len(st["notices"]) >= 3 and st, 5.0)
    got = causes(s)  # well before the 30 s grace: refusals are causes at once
    assert set(got) == {"no-demo-data", "wrong-bundle", "unauthenticated"}
    assert got["no-demo-data"]["clients"] == [2] and "--demo-data" in got["no-demo-data"]["message"] \
        and "--data FILE.npz" in got["no-demo-data"]["message"]
    assert got["wrong-bundle"]["clients"] == [3] and "runtime torch, no bundle" in got["wrong-bundle"]["message"]
    assert "not tokens.json" in got["unauthenticated"]["message"]
    lv.http.get("/v1/data/0", headers=lv.auth(1))  # a second device with the same cause: no second line
    time.sleep(1.5)
    assert len(lv.logs) == 3, lv.logs


def test_the_live_page_and_the_schema(watched):
    lv = watched
    page = lv.http.get("/run")
    assert page.status_code == 200 and 'src="/run.js"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    js = lv.http.get("/run.js")
    assert js.headers["content-type"].startswith("text/javascript") and "/v1/status?since=" in js.text
    assert lv.http.get("/", follow_redirects=False).headers["location"] == "/run"
    schema = lv.http.get("/openapi.json").json()
    status = schema["components"]["schemas"]["Status"]["properties"]
    assert {"slots", "notices", "history", "round_seconds", "eval_every"} <= set(status)
    assert "since" in json.dumps(schema["paths"]["/v1/status"])


def test_serve_refuses_a_web_folder_whose_modules_are_not_built(tmp_path, capsys):
    web = tmp_path / "web"
    web.mkdir()
    shutil.copy(REPO / "clients/js/web/index.html", web / "index.html")
    shutil.copy(REPO / "clients/js/web/build.mjs", web / "build.mjs")
    tk.issue(tmp_path / "tokens.json", 0)
    rc = cli(["serve", "--tokens", str(tmp_path / "tokens.json"), "--clients", "1", "--rounds", "1", "--port", "0",
              "--web", str(web), "--out", str(tmp_path / "run"), "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 2 and "listening" not in out
    assert "baffle-edge serve: error: --web" in err and "/web/dist/ort/ort.wasm.min.mjs, which is not built" in err
    assert f"cd {tmp_path} && npm run build && node web/build.mjs" in err
    for rel in ("dist/ort/ort.wasm.min.mjs", "dist/pkg/gateway.js"):
        (web / rel).parent.mkdir(parents=True, exist_ok=True)
        (web / rel).write_text("")
    check_web_dir(web)  # built: accepted
    (tmp_path / "src").mkdir()
    source = tmp_path / "src" / "gateway.ts"
    source.write_text("")
    built_at = (web / "dist/pkg/gateway.js").stat().st_mtime
    os.utime(source, (built_at - 10, built_at - 10))
    assert stale_web_build(web) is None  # sources older than the build
    os.utime(source, (built_at + 10, built_at + 10))
    assert "gateway.ts changed after the page's modules were built; rebuild with: cd" in stale_web_build(web)
    (web / "index.html").unlink()
    with pytest.raises(FileNotFoundError, match="no index.html"):
        check_web_dir(web)


def test_short_runs_are_evaluated_every_round_and_resume_may_change_it(tmp_path):
    from baffle_edge.cli import build_parser
    from baffle_edge.simulate import TrainConfig, train
    from baffle_edge.train_options import config_from_args
    parse = lambda *argv: config_from_args(build_parser().parse_args(["train", *argv])).eval_every
    assert (parse(), parse("--rounds", "10"), parse("--rounds", "20"), parse("--rounds", "21")) == (5, 1, 1, 5)
    assert parse("--rounds", "10", "--eval-every", "3") == 3
    cfg = TrainConfig(clients=2, k=4, rounds=2, eval_every=1, checkpoint_every=1, workers=1)
    seen = []
    train(cfg, tmp_path, progress=False, on_round=seen.append)
    assert [("test_accuracy" in r) for r in seen] == [True, True]
    more = []  # resumed with more rounds: the default evaluation interval changes, the trajectory does not
    train(dataclasses.replace(cfg, rounds=3, eval_every=5), tmp_path, resume=True, progress=False, on_round=more.append)
    assert [r["round"] for r in more] == [1, 2, 3] and more[:2] == seen
