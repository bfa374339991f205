"""BAFFLE over Flower, the fast parts: messages, run config, the app folder, node data files,
certificates and keys, and the deployment ClientApp/ServerApp logic driven in-process (a grid
that hands messages to the ClientApp handlers) against ``baffle-edge train``.

The process-level tests (simulation runtime, secured SuperLink + SuperNodes) are in
tests/test_flower_deploy.py."""
import dataclasses
import json
import time
import tomllib

import numpy as np
import pytest

from baffle_edge.simulate import TrainConfig, train

flwr = pytest.importorskip("flwr", reason="flwr not installed (pip install 'baffle-edge[flower]')")

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict  # noqa: E402

from baffle_edge.flower import appfolder, credentials, gather, nodedata, records, runconfig  # noqa: E402
from baffle_edge.flower.client import client_query, client_train  # noqa: E402
from baffle_edge.protocol import ClientReport  # noqa: E402


def strip(metrics, *, drop=("seconds",)):
    return [{k: v for k, v in r.items() if k not in drop} for r in metrics["rounds"]]


class LoopbackGrid:
    """A Flower Grid without a network: each message goes straight to the ClientApp handler of
    its node (node i has ``node_configs[i]``); a handler's exception becomes an error reply, as a
    SuperNode sends it."""

    def __init__(self, node_configs, *, silent=()):
        from flwr.supercore.task_identity import TaskIdentity
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.node_configs = {1000 + i: nc for i, nc in enumerate(node_configs)}
        self.sent: list[tuple[str, int]] = []
        self.replies: dict[str, Message] = {}
        self.silent = {1000 + i for i in silent}  # nodes that never answer (vanished after joining)

    def get_node_ids(self):
        return list(self.node_configs)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            node = m.metadata.dst_node_id
            m.metadata.__dict__["_message_id"] = mid = f"m{len(self.sent)}"
            self.sent.append((m.metadata.message_type, node))
            ids.append(mid)
            if node in self.silent:
                continue
            ctx = Context(run_id=1, node_id=node, node_config=self.node_configs[node], state=RecordDict(),
                          run_config={})
            handler = client_query if m.metadata.message_type == "query" else client_train
            try:
                reply = handler(m, ctx)
            except Exception as e:
                reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=m)
            self.replies[mid] = reply
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in ids if i in self.replies]

    def send_and_receive(self, messages, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def test_reply_round_trip_and_malformed_replies():
    r = ClientReport(round=1, client=2, losses=[1.0, 2.0], base_losses=[1.5], num_samples=32, model_version="ab")
    content = records.report_content(r)
    assert set(content) == {"losses", "report"}  # loss scalars and a header: never a gradient
    back = records.parse_report_content(content)
    assert np.array_equal(back.losses, r.losses) and back.client == 2
    bad = RecordDict({"report": ConfigRecord({"header": "[1"})})
    assert isinstance(records.parse_report_content(bad), ValueError)
    content["report"]["header"] = json.dumps({"round": 1})
    assert isinstance(records.parse_report_content(content), ValueError)


def test_compact_replies_round_trip_and_malformed_bytes_are_refused():
    from baffle_edge import compact
    r = ClientReport(round=1, client=2, losses=[1.0, 2.0, 1.25], base_losses=[1.5], num_samples=32, model_version="ab")
    content = records.report_content(r, "compact")
    assert set(content) == {"report"} and set(content["report"]) == {"compact"}  # the run's default encoding
    assert content["report"]["compact"] == compact.encode(r)
    back = records.parse_report_content(content)
    assert np.array_equal(back.losses, compact.roundtrip(r).losses) and back.client == 2
    for bad in (compact.encode(r)[:-1], b"BFLR", "text"):
        content["report"]["compact"] = bad
        err = records.parse_report_content(content)
        assert isinstance(err, ValueError) and "compact report" in str(err)


def test_run_config_parsing():
    cfg, fl = runconfig.config_from_run_config({"train-config": json.dumps({"clients": 4, "k": 7,
                                                                            "optim": {"lr": 0.05}}),
                                                "out": "x", "min-nodes": 2, "client-data": "node"})
    assert (cfg.clients, cfg.k, cfg.optim.lr, fl.min_nodes, fl.out, fl.client_data) == (4, 7, 0.05, 2, "x", "node")
    assert cfg.aggregate.value == "mean" and dataclasses.replace(cfg) == cfg
    for bad, match in (('{"kk": 1}', "unknown fields"), ('{"scheme": "backward"}', "backward"),
                       ('{"optim": {"lrr": 1}}', "optim"), ("[1]", "JSON object"), ("{", "not valid JSON")):
        with pytest.raises(ValueError, match=match):
            runconfig.config_from_run_config({"train-config": bad})
    with pytest.raises(ValueError, match="client-data"):
        runconfig.config_from_run_config({"client-data": "cloud"})


def test_app_folder_is_a_flower_app_with_our_components_and_config(tmp_path):
    from baffle_edge.cli import main
    assert main(["flower", "app", str(tmp_path / "app"), "--clients", "3", "--runtime", "onnxruntime-int8",
                 "--k", "20", "--quorum", "0.6", "--out", "/srv/runs/x"]) == 0
    py = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())
    assert py["tool"]["flwr"]["app"]["components"] == {"serverapp": "baffle_edge.flower.app:server_app",
                                                       "clientapp": "baffle_edge.flower.app:client_app"}
    run_config = py["tool"]["flwr"]["app"]["config"]
    cfg, fl = runconfig.config_from_run_config(run_config)
    assert (cfg.clients, cfg.k, cfg.runtime, cfg.quorum, cfg.round_timeout) == (3, 20, "onnxruntime-int8", 0.6, 300.0)
    assert (fl.client_data, fl.out, fl.min_nodes) == ("node", "/srv/runs/x", 3)
    assert json.loads(run_config["train-config"]) == {"clients": 3, "k": 20, "runtime": "onnxruntime-int8",
                                                      "quorum": 0.6, "round_timeout": 300.0}  # only non-defaults
    # Flower's own validation of the app folder accepts it
    from flwr.cli.config_utils import load_and_validate
    conf, warnings = load_and_validate(tmp_path / "app" / "pyproject.toml", check_module=True)  # raises if invalid
    assert conf["project"]["name"] == "baffle-flower" and not warnings
    # an existing app is not overwritten silently; bad settings fail at writing time
    assert main(["flower", "app", str(tmp_path / "app")]) == 2
    with pytest.raises(ValueError, match="unknown fields"):
        appfolder.write_app(tmp_path / "b", train_config={"kk": 1})
    with pytest.raises(ValueError, match="client-data"):
        appfolder.write_app(tmp_path / "b", client_data="cloud")


def test_node_data_files_reproduce_the_in_process_split(tmp_path, digits):
    from baffle_edge.data import partition
    parts = partition(digits.y_train, 3, seed=0)
    norm = {"scale": digits.scale, "mean": list(digits.mean), "std": list(digits.std)}
    for fmt in ("npz", "idx"):
        paths = nodedata.write_shards(tmp_path / fmt, clients=3, seed=0, fmt=fmt)
        for c, p in enumerate(paths):
            x_raw, y = nodedata.load_node_data(p)
            assert x_raw.dtype == np.uint8 and x_raw.shape[1:] == (1, 8, 8)
            x = nodedata.normalise(x_raw, norm, channels=1, size=8)
            assert np.array_equal(x, digits.x_train[parts[c]]) and np.array_equal(y, digits.y_train[parts[c]])
    with pytest.raises(FileExistsError):
        nodedata.write_shards(tmp_path / "npz", clients=3)
    # bad node data: clear errors, never unpickled
    np.savez(tmp_path / "nolabels.npz", x=np.zeros((2, 8, 8), np.uint8))
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    np.savez(tmp_path / "short.npz", x=np.zeros((2, 8, 8), np.uint8), y=np.array([0]))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    for name, match in (("nolabels", "expected arrays 'x' and 'y'"), ("objects", "not a readable"),
                        ("short", "matching x"), ("junk", "not a readable")):
        with pytest.raises(ValueError, match=match):
            nodedata.load_node_data(tmp_path / f"{name}.npz")
    with pytest.raises(FileNotFoundError):
        nodedata.load_node_data(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="model expects"):
        nodedata.normalise(np.zeros((2, 1, 28, 28), np.uint8), norm, channels=1, size=8)


def test_certificates_and_node_keys_are_what_flower_reads(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    files = credentials.make_certificates(tmp_path / "certs", ["127.0.0.1", "superlink.example"])
    ca = x509.load_pem_x509_certificate(files["ca.crt"].read_bytes())
    server = x509.load_pem_x509_certificate(files["server.pem"].read_bytes())
    server.verify_directly_issued_by(ca)  # raises if not signed by the CA
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "superlink.example" in sans.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert (files["server.key"].stat().st_mode & 0o777) == 0o600
    with pytest.raises(FileExistsError):
        credentials.make_certificates(tmp_path / "certs", ["127.0.0.1"])
    with pytest.raises(ValueError, match="host"):
        credentials.make_certificates(tmp_path / "c2", ["bad host!"])
    pairs = credentials.make_node_keys(tmp_path / "keys", ["node-0", "node-1"])
    from flwr.cli.supernode.register import try_load_public_key
    for priv, pub in pairs.values():
        key = load_ssh_private_key(priv.read_bytes(), None)  # what flower-supernode does
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert try_load_public_key(pub)  # what `flwr supernode register` does
    with pytest.raises(ValueError, match="key name"):
        credentials.make_node_keys(tmp_path / "keys", ["../evil"])
    # the same through the command line; bad input is an error message and exit code 2
    from baffle_edge.cli import main
    assert main(["flower", "certs", str(tmp_path / "c3"), "--hosts", "localhost,10.0.0.5"]) == 0
    assert main(["flower", "keys", str(tmp_path / "k3"), "--nodes", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "k3").iterdir()) == ["node-0", "node-0.pub", "node-1", "node-1.pub"]
    assert main(["flower", "shards", str(tmp_path / "s3"), "--clients", "2", "--format", "idx"]) == 0
    assert main(["flower", "certs", str(tmp_path / "c4"), "--hosts", "bad host!"]) == 2
    assert main(["flower", "keys", str(tmp_path / "k3"), "--nodes", "2"]) == 2  # exists: never overwritten silently


CFG = TrainConfig(clients=3, k=3, rounds=2, runtime="onnxruntime-int8", eval_every=1, checkpoint_every=2, workers=1)


def test_deployment_apps_on_node_data_reproduce_in_process_train(tmp_path):
    """ServerApp gather + ClientApp handlers, each node with its own file and partition id (given
    in another order than the node ids): same metrics as `baffle-edge train`, round for round."""
    paths = nodedata.write_shards(tmp_path / "data", clients=3, seed=0)
    grid = LoopbackGrid([{"data": str(paths[c]), "partition-id": c} for c in (2, 0, 1)])
    fl = runconfig.FlowerConfig(out=str(tmp_path / "flower"), client_data="node")
    got = train(CFG, tmp_path / "flower", progress=False, gather=gather.FlowerGather(grid, CFG, fl))
    local = train(CFG, tmp_path / "local", progress=False)
    # identical but for bytes down: Flower's messages carry float32 weights, an in-process int8 run counts a lean
    # device's integers (docs/gateway.md "Lean downloads")
    assert strip(got, drop=("seconds", "bytes_down")) == strip(local, drop=("seconds", "bytes_down"))
    assert all(f["bytes_down"] > 3 * 4 * 26_730 > l["bytes_down"] for f, l in zip(got["rounds"], local["rounds"]))
    assert [r["clients_accepted"] for r in got["rounds"]] == [3, 3]
    assert grid.sent.count(("query", 1000)) == 1  # each node is asked for its partition once
    # the round's int8 bundle travels with the task: the client can run without the server's files
    assert ("train", 1000) in grid.sent


def test_deployment_nodes_without_data_or_with_bad_data_never_crash_the_server(tmp_path):
    paths = nodedata.write_shards(tmp_path / "data", clients=3, seed=0)
    np.savez(tmp_path / "wrong.npz", x=np.zeros((4, 28, 28), np.uint8), y=np.zeros(4, np.int64))
    grid = LoopbackGrid([{"data": str(paths[0]), "partition-id": 0},
                         {},  # a SuperNode started without --node-config data=...: never assigned
                         {"data": str(tmp_path / "wrong.npz")},  # MNIST-sized images for a digits model
                         {"data": str(paths[2]), "partition-id": 2}],  # never answers: vanished
                        silent=[3])
    cfg = dataclasses.replace(CFG, runtime="torch", rounds=2, round_timeout=1.0)
    fl = runconfig.FlowerConfig(out=str(tmp_path / "run"), client_data="node", query_timeout=1.0)
    start = time.monotonic()
    m = train(cfg, tmp_path / "run", progress=False, gather=gather.FlowerGather(grid, cfg, fl))
    assert time.monotonic() - start < 30  # the silent node costs at most its query timeout per round
    for row in m["rounds"]:
        assert row["clients_accepted"] == 1 and row["absent"] == [2] and not row["skipped"]
        assert "model expects" in row["rejected"]["1"]  # the wrong-shaped node took a free client and failed
    assert grid.sent.count(("query", 1001)) == 2  # a node without data is asked again each round
    assert m["final"]["complete"]


def test_client_refuses_weights_that_do_not_match_the_task(tmp_path):
    from baffle_edge.simulate import Federation
    paths = nodedata.write_shards(tmp_path / "data", clients=3, seed=0)
    cfg = dataclasses.replace(CFG, runtime="torch")
    fed = Federation(cfg)
    grid = LoopbackGrid([{"data": str(paths[0])}])
    task, weights = fed.task(0, 0), fed.server.flat().numpy()
    msg = records.task_message(task, weights + 1e-3, cfg, 1000, payload=records.round_payload(fed),
                               client_data="node")
    reply = grid.send_and_receive([msg])[0]
    assert reply.has_error() and "model_version" in reply.error.reason
    ok = grid.send_and_receive([records.task_message(task, weights, cfg, 1000, payload=records.round_payload(fed),
                                                     client_data="node")])[0]
    assert isinstance(records.parse_reply(ok), ClientReport)


def test_the_flower_package_imports_one_way_and_loads_no_flwr_or_torch():
    """Every import between the package's modules (function-local ones too) goes one way and names
    no private (``_name``) name; importing the package itself loads neither flwr nor torch."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    import baffle_edge.flower as pkg
    folder = Path(pkg.__file__).parent
    graph = {}
    for path in folder.glob("*.py"):
        graph[path.stem] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                graph[path.stem].update([node.module] if node.module else [a.name for a in node.names])
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports private {private} from .{node.module}"
    assert "__init__" not in set().union(*graph.values())
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, f"import cycle: {' -> '.join(path + [module])}"
        for m in graph.get(module, ()):
            if m not in done:
                visit(m, path + [module])
        done.add(module)
    for module in graph:
        visit(module, [])
    code = "import sys, baffle_edge.flower; print(sorted({m.split('.')[0] for m in sys.modules} & {'flwr', 'torch'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]
