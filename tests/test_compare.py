"""``baffle-edge compare``: runs side by side at equal rounds, the gap to the backprop run, bad input named."""
from __future__ import annotations

import json

import pytest

from baffle_edge.cli import main
from baffle_edge.compare import compare, load_run


def _run(folder, *, method="baffle", runtime="torch", noise="block", acc=(0.1, 0.2, 0.3, 0.4), every=5,
         dataset="fashion-mnist", draw="size", cap=None):
    folder.mkdir(parents=True)
    rows = [{"round": r, "train_loss": 2.0 - r / 100} for r in range(1, every * len(acc) + 1)]
    for i, a in enumerate(acc):
        rows[every * (i + 1) - 1]["test_accuracy"] = a
    config = {"method": method, "runtime": runtime, "noise": noise, "block_draw": draw, "dataset": dataset,
              "model": "lenet", "int8_block_steps": cap}
    (folder / "metrics.json").write_text(json.dumps({"config": config, "rounds": rows, "rounds_per_epoch": 10}))
    return folder


def test_table_gaps_to_the_backprop_run_and_figure(tmp_path):
    a = _run(tmp_path / "a", acc=(0.10, 0.30, 0.50, 0.60))
    bp = _run(tmp_path / "a" / "bp", method="bp", acc=(0.20, 0.40, 0.55, 0.70))
    res = compare([str(a), str(bp)], figure=tmp_path / "fig.png")
    assert res["reference"] == "bp"
    by_round = {row["round"]: row for row in res["table"]}
    assert sorted(k for k in by_round if isinstance(k, int)) == [5, 10, 15, 20]
    assert by_round[20]["torch block"] == pytest.approx(60.0)
    assert by_round[20]["torch block - bp"] == pytest.approx(-10.0)
    assert by_round[15]["torch block - bp"] == pytest.approx(-5.0)
    assert by_round[20]["epochs"] == 2.0
    late = res["table"][-1]
    assert late["torch block"] == pytest.approx(37.5) and late["bp"] == pytest.approx(46.25)
    assert (tmp_path / "fig.png").stat().st_size > 1000
    assert "| 20 | 2.00 | 60.00 | 70.00 | -10.00 |" in res["markdown"]


def test_asked_rounds_labels_and_an_explicit_reference(tmp_path):
    a = _run(tmp_path / "a", runtime="onnxruntime-int8", acc=(0.1, 0.2, 0.3, 0.4))
    b = _run(tmp_path / "b", draw="adaptive", acc=(0.2, 0.3, 0.4, 0.5))
    assert load_run(b).label == "torch block adaptive"
    capped = _run(tmp_path / "c", runtime="onnxruntime-int8", cap=4)
    assert load_run(capped).label == "onnxruntime-int8 block <=4 steps" and load_run(a).label == "onnxruntime-int8 block"
    res = compare([str(a), str(b)], labels=["int8", "fp32"], rounds=[10, 20], reference="fp32")
    assert [row["round"] for row in res["table"][:-1]] == [10, 20]
    assert res["table"][1]["int8 - fp32"] == pytest.approx(-10.0)


def test_the_cli_prints_the_table_and_json(tmp_path, capsys):
    a, bp = _run(tmp_path / "a"), _run(tmp_path / "bp", method="bp")
    assert main(["compare", str(a), str(bp)]) == 0
    assert "torch block - bp" in capsys.readouterr().out
    assert main(["compare", str(a / "metrics.json"), str(bp), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["reference"] == "bp"


@pytest.mark.parametrize("case, message", [
    ("missing", "no metrics.json"),
    ("garbage", "not a run's metrics.json"),
    ("no-evals", "no evaluated round yet"),
    ("datasets", "different datasets"),
    ("round", "not evaluated in every run"),
    ("labels", "--label given 1 times for 2 runs"),
    ("reference", "is none of the runs"),
])
def test_bad_input_is_named(tmp_path, capsys, case, message):
    a = _run(tmp_path / "a")
    other = {"missing": lambda: tmp_path / "nothing",
             "garbage": lambda: (tmp_path / "g").mkdir() or (tmp_path / "g" / "metrics.json").write_text("{]") and tmp_path / "g",
             "no-evals": lambda: _run(tmp_path / "n", acc=()),
             "datasets": lambda: _run(tmp_path / "d", dataset="digits")}.get(case, lambda: _run(tmp_path / "b"))()
    extra = {"round": ["--rounds", "7"], "labels": ["--label", "x"], "reference": ["--reference", "nope"]}.get(case, [])
    assert main(["compare", str(a), str(other), *extra]) == 2
    assert message in capsys.readouterr().err
