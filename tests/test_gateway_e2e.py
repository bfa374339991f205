"""`baffle-edge serve` with device processes over loopback HTTP(S): the same result as
`baffle-edge train`, a device killed mid-run, the server killed with SIGKILL and resumed, TLS.
Every process is bounded by a timeout and killed at the end of its test."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="pip install 'baffle-edge[serve]'")
httpx = pytest.importorskip("httpx")

from baffle_edge.cli import main as cli
from baffle_edge.gateway import tokens as tk

RUN = ["--clients", "3", "--k", "4", "--rounds", "3", "--eval-every", "1", "--checkpoint-every", "1",
       "--no-progress"]
TIMEOUT = 120  # seconds any process of these tests may live


class Procs:
    def __init__(self, tmp: Path):
        self.tmp, self.procs = tmp, []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 - lives as long as the process
        p = subprocess.Popen([sys.executable, "-m", "baffle_edge", *args], stdout=subprocess.PIPE if name.startswith(
            "serve") else log, stderr=log, text=True, cwd=self.tmp)
        p.name = name
        self.procs.append(p)
        return p

    def serve(self, name: str, *args: str, port: int = 0) -> tuple[subprocess.Popen, int]:
        p = self.start(name, "serve", "--tokens", "tokens.json", "--port", str(port), "--linger", "1", *args)
        line = p.stdout.readline()  # "baffle-edge serve: listening on http://127.0.0.1:PORT ..."
        if "listening on" not in line:
            p.wait(30)
            raise AssertionError(f"server did not start: {line}{(self.tmp / f'{name}.log').read_text()}")
        return p, int(line.split("127.0.0.1:")[1].split()[0])

    def device(self, name: str, url: str, client: int, *args: str) -> subprocess.Popen:
        return self.start(name, "device", "--server", url, "--token", f"toks/client-{client}.token", *args)

    def wait(self, p: subprocess.Popen, timeout: float = TIMEOUT) -> int:
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{p.name} still running after {timeout} s: "
                                 f"{(self.tmp / f'{p.name}.log').read_text()[-2000:]}") from None

    def kill_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def procs(tmp_path):
    path = tmp_path / "tokens.json"
    (tmp_path / "toks").mkdir()
    for c in range(3):
        (tmp_path / "toks" / f"client-{c}.token").write_text(tk.issue(path, c)[1])
    ps = Procs(tmp_path)
    yield ps
    ps.kill_all()


def rows(folder: Path) -> list[dict]:
    m = json.loads((folder / "metrics.json").read_text())
    return [{k: v for k, v in r.items() if k != "seconds"} for r in m["rounds"]]


def weights(folder: Path) -> dict:
    return torch.load(folder / "checkpoint.pt", weights_only=True)["server"]["model"]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def status(port: int, scheme: str = "http", **kw) -> dict:
    return httpx.get(f"{scheme}://127.0.0.1:{port}/v1/status", timeout=30, **kw).json()  # a loaded machine answers late


@pytest.mark.parametrize("runtime,clients", [
    ("torch", 3),
    # int8 over HTTP is also covered by clients/js/test/gateway.test.ts (Node devices) and, in
    # process, by tests/test_gateway.py (bundle files, sha256); this run is kept for -m slow
    pytest.param("onnxruntime-int8", 2, marks=pytest.mark.slow)])
def test_devices_over_http_reproduce_train(procs, tmp_path, runtime, clients):
    # float64 reports (JSON from client 1, NPZ from the others); compact ones: the resume test below
    args = [*RUN, "--runtime", runtime, "--clients", str(clients), "--report-encoding", "json"]
    assert cli(["train", *args, "--out", str(tmp_path / "ref")]) == 0
    server, port = procs.serve("serve", *args, "--demo-data", "--out", "run")
    url = f"http://127.0.0.1:{port}"
    devices = [procs.device(f"device{c}", url, c, *(["--upload", "json"] if c == 1 else []))
               for c in range(clients)]
    assert procs.wait(server) == 0
    assert all(procs.wait(d) == 0 for d in devices)
    got = rows(tmp_path / "run")
    assert [r["clients_accepted"] for r in got] == [clients] * 3
    assert got == rows(tmp_path / "ref")  # losses, accuracy, bytes: identical per round
    assert same_weights(tmp_path / "run", tmp_path / "ref")
    gw = json.loads((tmp_path / "run" / "metrics.json").read_text())["gateway"]
    assert gw["accepted_reports"] == 3 * clients and gw["rejected_by_kind"] == {}


def test_a_device_killed_mid_run_leaves_the_rounds_to_quorum_and_deadline(procs, tmp_path):
    server, port = procs.serve("serve", *RUN, "--rounds", "4", "--round-timeout", "8", "--quorum", "0.5",
                               "--demo-data", "--out", "run")
    url = f"http://127.0.0.1:{port}"
    devices = [procs.device(f"device{c}", url, c) for c in range(3)]
    deadline = time.monotonic() + 60
    while status(port)["round"] in (None, 1) and time.monotonic() < deadline:
        time.sleep(0.05)
    devices[2].send_signal(signal.SIGKILL)
    assert procs.wait(server) == 0
    assert procs.wait(devices[0]) == 0 and procs.wait(devices[1]) == 0
    got = rows(tmp_path / "run")
    assert len(got) == 4 and got[0]["clients_accepted"] == 3
    assert got[-1]["clients_accepted"] == 2 and got[-1]["absent"] == [2] and got[-1]["applied"]
    assert not any(r["skipped"] for r in got)  # 2 of 3 meets the 0.5 quorum


def test_server_sigkill_and_resume_finishes_like_an_uninterrupted_run(procs, tmp_path):
    args = [*RUN, "--rounds", "5"]
    assert cli(["train", *args, "--out", str(tmp_path / "ref")]) == 0
    server, port = procs.serve("serve1", *args, "--demo-data", "--out", "run")
    url = f"http://127.0.0.1:{port}"
    devices = [procs.device(f"device{c}", url, c, "--patience", "60") for c in range(3)]
    deadline = time.monotonic() + 60
    while (status(port)["round"] or 0) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    server.send_signal(signal.SIGKILL)  # mid-run: rounds 1-2 checkpointed, round 3 open or closing
    server.wait(10)
    done = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"]
    assert 2 <= len(done) < 5
    time.sleep(1.0)  # devices see the connection refused and keep retrying
    server, _ = procs.serve("serve2", *args, "--demo-data", "--out", "run", "--resume", port=port)
    assert procs.wait(server) == 0
    assert all(procs.wait(d) == 0 for d in devices)
    assert rows(tmp_path / "run") == rows(tmp_path / "ref")
    assert same_weights(tmp_path / "run", tmp_path / "ref")


def self_signed(tmp: Path) -> tuple[Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    return tmp / "cert.pem", tmp / "key.pem"


def test_tls(procs, tmp_path):
    pytest.importorskip("cryptography")
    cert, key = self_signed(tmp_path)
    server, port = procs.serve("serve", *RUN, "--clients", "1", "--rounds", "1", "--demo-data", "--out", "run",
                               "--tls-cert", str(cert), "--tls-key", str(key))
    with pytest.raises(httpx.ConnectError):  # the certificate is not trusted without --cafile
        status(port, "https")
    with pytest.raises(httpx.HTTPError):  # no plain HTTP on a TLS port
        status(port, "http")
    import ssl
    assert status(port, "https", verify=ssl.create_default_context(cafile=str(cert)))["rounds"] == 1
    device = procs.device("device0", f"https://127.0.0.1:{port}", 0, "--cafile", str(cert))
    assert procs.wait(server) == 0 and procs.wait(device) == 0
    assert rows(tmp_path / "run")[0]["clients_accepted"] == 1


def test_serve_refuses_bad_setups(tmp_path, capsys):
    assert cli(["serve", *RUN, "--tokens", str(tmp_path / "none.json"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    tk.issue(tmp_path / "t.json", 0)
    assert cli(["serve", *RUN, "--tokens", str(tmp_path / "t.json"), "--tls-cert", "c.pem"]) == 2
    assert "--tls-key" in capsys.readouterr().err
    assert cli(["serve", *RUN, "--tokens", str(tmp_path / "t.json"), "--method", "bp"]) == 2
    assert "BAFFLE" in capsys.readouterr().err
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        busy = s.getsockname()[1]
        assert cli(["serve", *RUN, "--tokens", str(tmp_path / "t.json"), "--port", str(busy),
                    "--out", str(tmp_path / "o2")]) == 2
        assert "cannot listen" in capsys.readouterr().err
