"""A new user's mistakes (issue 27): each ends in one ``error:`` line that says what to do, exit
code 2, no traceback unless ``--debug``. Devices talk to a stub server on 127.0.0.1 (a thread,
every request answered at once), so nothing here waits for a round."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from baffle_edge.cli import main
from baffle_edge.gateway import tokens as tk


def run(argv, capsys):
    """(exit code, stderr lines) of ``baffle-edge argv``."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    captured = capsys.readouterr()
    run.out, err = captured.out, captured.err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.strip()]


def one_error(argv, capsys) -> str:
    code, lines = run(argv, capsys)
    assert code == 2, lines
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    return errors[0]


@pytest.fixture
def issued(tmp_path):
    """tokens.json and device-tokens/client-{0,1}.token, as the README's first step writes them."""
    main(["tokens", "issue", "--tokens", str(tmp_path / "tokens.json"), "--clients", "2",
          "--out-dir", str(tmp_path / "device-tokens")])
    return tmp_path


class Stub:
    """A stand-in `serve` on 127.0.0.1: /v1/config answers ``status`` with ``body``; records the
    Authorization headers it was sent."""

    def __init__(self, status: int, body: dict):
        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # http.server calls it by this name
                seen.append(self.headers.get("Authorization"))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def stub():
    servers = []

    def make(status, body):
        servers.append(Stub(status, body))
        return servers[-1]
    yield make
    for s in servers:
        s.close()


UNAUTHENTICATED = {"error": "unauthenticated", "reason": "missing, unknown or revoked bearer token"}
CONFIG = {"client": 0, "demo_data": False, "model": None, "train_config": {"runtime": "torch"}}


# --- (2) a wrong token file ---
def test_the_servers_token_file_as_a_device_token_is_named_before_any_request(issued, stub, capsys):
    server = stub(401, UNAUTHENTICATED)
    line = one_error(["device", "--server", server.url, "--token", str(issued / "tokens.json"), "--patience", "30"],
                     capsys)
    assert "is the server's tokens.json" in line and "device-tokens/client-N.token" in line
    assert "--out-dir" in line and "unreachable" not in line
    assert server.seen == []  # refused before any request


@pytest.mark.parametrize("text, says", [("bfl_abc def\n", "which an HTTP header cannot carry"),
                                        ("bfl_\u00e9t\u00e9\n", "which an HTTP header cannot carry"),
                                        ("hello\n", "does not hold a baffle-edge device token"),
                                        ("\n", "is empty")])
def test_a_token_a_header_cannot_carry_is_refused_before_any_request(tmp_path, stub, capsys, text, says):
    server = stub(401, UNAUTHENTICATED)
    (tmp_path / "t.token").write_text(text)
    line = one_error(["device", "--server", server.url, "--token", str(tmp_path / "t.token")], capsys)
    assert says in line and "unreachable" not in line and server.seen == []


def test_an_unknown_token_is_one_line_saying_what_to_do(issued, stub, capsys):
    server = stub(401, UNAUTHENTICATED)
    line = one_error(["device", "--server", server.url, "--token", str(issued / "device-tokens" / "client-0.token")],
                     capsys)
    assert line.startswith("baffle-edge device: error: config: HTTP 401 unauthenticated")
    assert "tokens issue --tokens tokens.json --client N --replace" in line
    assert len(server.seen) == 1  # a 401 is not retried


def test_a_token_for_a_slot_outside_the_run_says_so(issued, stub, capsys):
    server = stub(403, {"error": "no-slot", "reason": "client 7 is not part of this run"})
    line = one_error(["device", "--server", server.url, "--token", str(issued / "device-tokens" / "client-0.token")],
                     capsys)
    assert "HTTP 403 no-slot" in line and "below the server's --clients" in line


def test_debug_shows_the_traceback(issued, stub, capsys):
    from baffle_edge.gateway.device import DeviceError
    server = stub(401, UNAUTHENTICATED)
    token = str(issued / "device-tokens" / "client-0.token")
    for argv in (["--debug", "device", "--server", server.url, "--token", token],
                 ["device", "--server", server.url, "--token", token, "--debug"]):
        with pytest.raises(DeviceError, match="HTTP 401"):
            main(argv)


def test_a_missing_token_file_names_the_resolved_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = one_error(["device", "--server", "http://127.0.0.1:9", "--token", "device-tokens/client-3.token"], capsys)
    assert f"token file {tmp_path / 'device-tokens' / 'client-3.token'} does not exist" in line


# --- (3) a device without data, a server without --demo-data ---
def test_no_data_from_a_plain_server_is_the_one_error_line(issued, stub, capsys):
    server = stub(200, CONFIG)
    line = one_error(["device", "--server", server.url, "--token", str(issued / "device-tokens" / "client-0.token")],
                     capsys)
    assert "(not a --demo-data server): pass --data FILE.npz" in line
    assert len(server.seen) == 1  # refused at /v1/config, before waiting for a task


# --- (4) serve --tokens given a device token ---
def test_serve_given_a_device_token_says_which_file_it_needs(issued, capsys):
    line = one_error(["serve", "--tokens", str(issued / "device-tokens" / "client-1.token"), "--out",
                      str(issued / "run")], capsys)
    assert "is a device token, not the server's token file" in line and "tokens.json" in line
    with pytest.raises(ValueError, match="is a device token"):
        tk.TokenStore(issued / "device-tokens" / "client-1.token")


# --- (6) typos ---
def test_an_unknown_option_shows_the_subcommands_usage_and_the_close_name(capsys):
    code, lines = run(["serve", "--tokens", "tokens.json", "--demo-date"], capsys)
    assert code == 2 and lines[0].startswith("usage: baffle-edge serve ")
    assert lines[-1] == "baffle-edge serve: error: unrecognized arguments: --demo-date (did you mean --demo-data?)"
    code, lines = run(["tokens", "issue", "--tokens", "t.json", "--clinet", "3"], capsys)
    assert code == 2 and lines[0].startswith("usage: baffle-edge tokens issue ")
    assert lines[-1].endswith("unrecognized arguments: --clinet 3 (did you mean --client?)")


def test_a_mistyped_command_gets_the_close_name(capsys):
    code, lines = run(["serv"], capsys)
    assert code == 2 and "invalid choice: 'serv'" in lines[-1] and lines[-1].endswith("(did you mean serve?)")
    code, lines = run(["tokens", "isue"], capsys)
    assert code == 2 and lines[-1].endswith("(did you mean issue?)")


def test_tokens_issue_honours_or_refuses_every_output_option(tmp_path, capsys):
    store = str(tmp_path / "tokens.json")
    code, _ = run(["tokens", "issue", "--tokens", store, "--client", "3", "--out-dir", str(tmp_path / "d")], capsys)
    token = (tmp_path / "d" / "client-3.token").read_text().strip()
    assert code == 0 and tk.TokenStore(store).authenticate(token) == tk.Device("client-3", 3)
    assert oct((tmp_path / "d" / "client-3.token").stat().st_mode & 0o777) == "0o600"
    assert "--out-dir DIR (--out FILE is for one --client C)" in one_error(
        ["tokens", "issue", "--tokens", store, "--clients", "2", "--out", str(tmp_path / "x")], capsys)
    assert "not both" in one_error(["tokens", "issue", "--tokens", store, "--client", "4", "--out", str(tmp_path / "y"),
                                    "--out-dir", str(tmp_path / "d")], capsys)
    assert "--name names one device" in one_error(["tokens", "issue", "--tokens", store, "--clients", "2", "--name",
                                                   "phone", "--out-dir", str(tmp_path / "e")], capsys)


def test_a_runtime_typo_is_refused_before_the_server_listens(issued, capsys):
    pytest.importorskip("uvicorn", reason="pip install 'baffle-edge[serve]'")
    code, lines = run(["serve", "--tokens", str(issued / "tokens.json"), "--runtime", "onnxruntime_int8",
                       "--port", "0", "--out", str(issued / "run")], capsys)
    assert code == 2 and "listening" not in run.out
    want = ("baffle-edge serve: error: unknown runtime 'onnxruntime_int8' (did you mean onnxruntime-int8?); "
            "known: onnxruntime, onnxruntime-int8, tflite-int8, torch, torch-int8 (`baffle-edge runtimes` lists them)")
    assert lines == [want]
    code, lines = run(["serve", "--tokens", str(issued / "tokens.json"), "--runtime", "onnxruntime-int8",
                       "--noise", "gaussian", "--port", "0", "--out", str(issued / "run2")], capsys)
    assert code == 2 and "listening" not in run.out  # clashing options too, before anything listens
    assert len(lines) == 1 and "use --noise rademacher" in lines[0], lines


def test_a_request_the_client_cannot_send_is_not_an_unreachable_server(stub):
    from baffle_edge.gateway.device import Device, DeviceConfig, DeviceError
    server = stub(200, CONFIG)
    dev = Device(DeviceConfig(server=server.url, token="bfl_x\n{", patience=30))  # past read_token's checks
    try:
        with pytest.raises(DeviceError, match="a client-side mistake, not the server"):
            dev.request("GET", "/v1/config")
    finally:
        dev.close()
    assert server.seen == []
