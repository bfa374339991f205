"""Flower's processes started from here: SuperLink and SuperNode command lines, starting and
stopping them with every descendant, waiting for a SuperLink's health, a private ``flwr`` CLI
home, and following ``flwr run --stream``.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Process:
    """A Flower process started by us (in its own process group, so its children stop with it)."""

    name: str
    popen: "object"
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; every descendant is killed too (Flower starts
        SuperExec, ServerApp and ClientApp processes, some in sessions of their own)."""
        import signal
        import subprocess
        tree = descendants(self.popen.pid)
        if self.popen.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
                _signal_group(self.popen.pid, sig)
                try:
                    self.popen.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.kill_tree(tree)
        return self.popen.poll()

    def kill(self) -> None:
        """SIGKILL the process and every descendant at once: a device that vanished."""
        import signal
        tree = descendants(self.popen.pid)
        _signal_group(self.popen.pid, signal.SIGKILL)
        self.kill_tree(tree)
        self.popen.wait(10)

    def kill_tree(self, pids: list[int]) -> None:
        import signal
        for pid in pids + descendants(self.popen.pid):
            _signal_group(pid, signal.SIGKILL)
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _signal_group(pid: int, sig) -> None:
    """Signal the process group led by ``pid`` (if ``pid`` leads one)."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def flower_env(**extra: str) -> dict:
    """The environment for Flower processes started from here: this interpreter's scripts first on
    PATH (the SuperLink and SuperNode start ``flwr-serverapp`` / ``flwr-clientapp`` by name, which
    must import this baffle_edge, not another installation's), Flower's update check off, SuperExec
    polling for new tasks every 0.1 s instead of 1 s."""
    import sys
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.update(extra)
    return env


def start_process(name: str, cmd: list[str], log: Path, *, env: dict | None = None) -> Process:
    import subprocess
    f = open(log, "ab")
    try:
        popen = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, start_new_session=True)
    finally:
        f.close()
    return Process(name, popen, log)


def wait_healthy(address: str, *, ca: Path | None, timeout: float, process: Process | None = None) -> float:
    """Wait until the SuperLink at ``address`` answers ``/health``; returns the seconds waited."""
    import httpx
    start = time.monotonic()
    url = f"{'https' if ca else 'http'}://{address}/health"
    while time.monotonic() - start < timeout:
        if process is not None and not process.alive():
            raise RuntimeError(f"{process.name} exited with code {process.popen.poll()}:\n{process.tail()}")
        try:
            import ssl
            verify = ssl.create_default_context(cafile=str(ca)) if ca else False
            if httpx.get(url, verify=verify, timeout=2.0).is_success:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"no SuperLink answered at {url} within {timeout:.0f} s")


def flwr_home(directory: Path, connections: dict[str, dict]) -> Path:
    """A private Flower CLI home (``FLWR_HOME``) whose config.toml holds ``connections``
    (name -> keys of a ``[superlink.NAME]`` table); the first one is the default."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{next(iter(connections))}"', ""]
    for name, keys in connections.items():
        lines.append(f"[superlink.{name}]")
        for k, v in keys.items():
            lines.append(f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}")
        lines.append("")
    (directory / "config.toml").write_text("\n".join(lines))
    return directory


def follow(cmd: list[str], *, env: dict, timeout: float | None, log: Path | None = None,
           echo: bool = True, verbose: bool = False) -> tuple[int, str]:
    """Run ``cmd`` (``flwr run ... --stream``) to its end, echoing the ServerApp's per-round lines
    (all lines with ``verbose``; none without ``echo``) to stderr as progress, appending everything
    to ``log``.
    Returns (exit code, the last lines). Killed after ``timeout`` seconds (TimeoutError)."""
    import collections
    import signal
    import subprocess
    import sys
    import threading
    tail: collections.deque = collections.deque(maxlen=200)
    p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True)
    sink = open(log, "ab") if log is not None else None

    def pump() -> None:
        for raw in p.stdout:
            if sink is not None:
                sink.write(raw)
                sink.flush()
            line = raw.decode(errors="replace").rstrip()
            tail.append(line)
            if echo and (verbose or "baffle-edge:" in line):
                print(line, file=sys.stderr, flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = p.wait(timeout)
    except subprocess.TimeoutExpired:
        _signal_group(p.pid, signal.SIGKILL)
        p.wait(10)
        raise TimeoutError(f"{' '.join(cmd[:3])} did not finish within {timeout:.0f} s") from None
    finally:
        reader.join(10)
        if sink is not None:
            sink.close()
    return code, "\n".join(tail)


def superlink_command(port: int, *, certs: Path | None = None, node_auth: bool = False, simulation: bool = False,
                      host: str = "127.0.0.1") -> list[str]:
    cmd = ["flower-superlink", "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if certs is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
                "--ssl-keyfile", str(certs / "server.key")]
    if node_auth:
        cmd.append("--enable-supernode-auth")
    if simulation:
        cmd += ["--simulation", "--isolation", "subprocess"]
    return cmd


def supernode_command(superlink: str, port: int, *, ca: Path | None = None, key: Path | None = None,
                      node_config: str = "") -> list[str]:
    cmd = ["flower-supernode", "--superlink", superlink, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--root-certificates", str(ca)] if ca else ["--insecure"]
    if key is not None:
        cmd += ["--auth-supernode-private-key", str(key)]
    if node_config:
        cmd += ["--node-config", node_config]
    return cmd
