"""A secured federation on one machine (``LocalFederation``: a SuperLink with TLS and SuperNode
authentication, SuperNodes as processes) and ``run_local``, the whole runbook of docs/flower.md
on it (``baffle-edge flower local``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .appfolder import write_app
from .credentials import make_certificates, make_node_keys
from .nodedata import write_shards
from .processes import (
    Process,
    flower_env,
    flwr_home,
    follow,
    free_port,
    start_process,
    superlink_command,
    supernode_command,
    wait_healthy,
)


class LocalFederation:
    """A secured federation on this machine, every part a separate process on 127.0.0.1: a
    SuperLink with TLS (a fresh private CA) and SuperNode authentication, ``len(node_configs)``
    SuperNodes each with its own registered key pair and ``--node-config``, and a private Flower
    CLI home for ``flwr``. For tests and for trying the runbook (docs/flower.md) before using
    several machines. ``stop()`` (or leaving the ``with`` block) ends every process it started."""

    def __init__(self, work: str | Path, node_configs: list[str], *, tls: bool = True, node_auth: bool = True):
        if node_auth and not tls:
            raise ValueError("SuperNode authentication needs TLS")
        self.work = Path(work).resolve()
        self.node_configs = list(node_configs)
        self.tls, self.node_auth = tls, node_auth
        self.superlink: Process | None = None
        self.nodes: dict[int, Process] = {}
        self.port = 0
        self.certs = self.work / "certs"
        self.keys = self.work / "keys"
        self.timings: dict[str, float] = {}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def env(self) -> dict:
        return flower_env(FLWR_HOME=str(self.work / "flwr-home"))

    def start(self, *, timeout: float = 60.0) -> "LocalFederation":
        import subprocess
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "logs").mkdir(exist_ok=True)
        t0 = time.monotonic()
        if self.tls:
            make_certificates(self.certs, ["127.0.0.1", "localhost"], force=True)
        if self.node_auth:
            make_node_keys(self.keys, [f"node-{i}" for i in range(len(self.node_configs))] + ["intruder"], force=True)
        self.timings["credentials"] = time.monotonic() - t0
        self.port = free_port()
        conn = {"address": self.address}
        conn.update({"root-certificates": str(self.certs / "ca.crt")} if self.tls else {"insecure": True})
        flwr_home(self.work / "flwr-home", {"local": conn})
        t0 = time.monotonic()
        self.superlink = start_process("SuperLink", superlink_command(self.port, certs=self.certs if self.tls else None,
                                                                      node_auth=self.node_auth),
                                       self.work / "logs" / "superlink.log", env=self.env)
        wait_healthy(self.address, ca=self.certs / "ca.crt" if self.tls else None, timeout=timeout,
                     process=self.superlink)
        self.timings["superlink"] = time.monotonic() - t0
        if self.node_auth:
            t0 = time.monotonic()
            for i in range(len(self.node_configs)):
                done = subprocess.run(["flwr", "supernode", "register", str(self.keys / f"node-{i}.pub"), "local",
                                       "--name", f"node-{i}"], env=self.env, capture_output=True, text=True,
                                      timeout=timeout, stdin=subprocess.DEVNULL)
                if done.returncode != 0:
                    raise RuntimeError(f"flwr supernode register failed:\n{done.stdout}{done.stderr}")
            self.timings["register"] = time.monotonic() - t0
        t0 = time.monotonic()
        for i in range(len(self.node_configs)):
            self.start_node(i)
        self.wait_nodes(len(self.node_configs), timeout=timeout)
        self.timings["supernodes"] = time.monotonic() - t0
        return self

    def node_command(self, i: int, *, key: str | None = None, with_key: bool = True) -> list[str]:
        """The command starting SuperNode ``i`` (``i = -1``: a node with no config), authenticated with
        key pair ``key`` (default ``node-i``) unless ``with_key`` is false."""
        key_path = self.keys / (key or f"node-{i}") if self.node_auth and with_key else None
        return supernode_command(self.address, free_port(), ca=self.certs / "ca.crt" if self.tls else None,
                                 key=key_path, node_config=self.node_configs[i] if i >= 0 else "")

    def start_node(self, i: int) -> Process:
        self.nodes[i] = start_process(f"SuperNode {i}", self.node_command(i), self.work / "logs" / f"node-{i}.log",
                                      env=self.env)
        return self.nodes[i]

    def restart_node(self, i: int, *, timeout: float = 180.0, retry_every: float = 5.0) -> float:
        """Start SuperNode i again and keep retrying until the SuperLink activates it; returns the
        seconds it took. A SuperNode that crashed stays "online" on the SuperLink until its
        heartbeat expires (2 x 30 s in Flower 1.42), and until then a restart with the same key is
        refused ("Failed to activate SuperNode") and exits: supervise SuperNodes with a restart loop
        (systemd ``Restart=on-failure``), as this does."""
        start = time.monotonic()
        log = self.work / "logs" / f"node-{i}.log"
        while True:
            offset = log.stat().st_size if log.exists() else 0
            p = self.start_node(i)
            while p.alive() and time.monotonic() - start < timeout:
                with open(log, "rb") as f:
                    f.seek(offset)
                    if b"SuperNode ID:" in f.read():
                        return time.monotonic() - start
                time.sleep(0.5)
            if p.alive() or time.monotonic() - start >= timeout:
                raise TimeoutError(f"SuperNode {i} was not activated within {timeout:.0f} s:\n{p.tail()}")
            time.sleep(retry_every)

    def try_node(self, name: str, *, key: str | None = None, with_key: bool = True,
                 timeout: float = 90.0) -> tuple[int | None, str]:
        """Start a SuperNode with no data that should be refused (``key``: a key pair that may not be
        registered; ``with_key=False``: no key at all); wait for it to exit. Returns its exit code
        (None: still running after ``timeout``, then killed) and its log."""
        import subprocess
        log = self.work / "logs" / f"{name}.log"
        p = start_process(name, self.node_command(-1, key=key, with_key=with_key) + ["--max-retries", "1"], log,
                          env=self.env)
        try:
            code = p.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        p.stop(timeout=5.0)  # its SuperExec child, if it outlived it
        return code, log.read_text(errors="replace")

    def kill_node(self, i: int) -> None:
        """Kill SuperNode i abruptly, with its ClientApp processes (a device that vanished)."""
        self.nodes[i].kill()

    def online_nodes(self) -> int:
        """How many SuperNodes the SuperLink lists as online (``flwr supernode ls``)."""
        import subprocess
        done = subprocess.run(["flwr", "supernode", "ls", "local", "--format", "json"], env=self.env,
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        try:
            nodes = json.loads(done.stdout[done.stdout.index("{"):]).get("nodes", [])
        except ValueError:
            return 0
        return sum(1 for n in nodes if n.get("status") == "online")

    def wait_nodes(self, n: int, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, p in self.nodes.items():
                if not p.alive():
                    raise RuntimeError(f"{p.name} exited with code {p.popen.poll()}:\n{p.tail()}")
            if self.online_nodes() >= n:
                return
            time.sleep(0.5)
        raise TimeoutError(f"fewer than {n} SuperNodes online after {timeout:.0f} s")

    def run(self, app: str | Path, *, run_config: str | None = None, timeout: float = 600.0,
            progress: bool = False) -> int:
        """``flwr run APP local --stream`` to its end (bounded by ``timeout``); the output goes to
        logs/flwr-run.log (and the per-round lines to stderr with ``progress``). Returns the exit code."""
        cmd = ["flwr", "run", str(app), "local", "--stream"]
        if run_config:
            cmd += ["--run-config", run_config]
        log = self.work / "logs" / "flwr-run.log"
        return follow(cmd, env=self.env, timeout=timeout, log=log, echo=progress)[0]

    def stop(self) -> None:
        for p in list(self.nodes.values()) + ([self.superlink] if self.superlink else []):
            p.stop(timeout=5.0)

    def __enter__(self) -> "LocalFederation":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def run_local(cfg, out: str | Path, *, work: str | Path, timeout: float = 3600.0) -> tuple[dict, dict]:
    """The whole runbook on this machine: node data files, certificates, keys, a SuperLink with TLS
    and SuperNode authentication, one SuperNode per client on its own file, the app, ``flwr run``.
    Returns (metrics, timings in seconds)."""
    work = Path(work).resolve()
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder {out} is not empty; choose another --out")
    t0 = time.monotonic()
    shards = write_shards(work / "data", dataset=cfg.dataset, data_dir=cfg.data_dir, clients=cfg.clients,
                          partition=cfg.partition, alpha=cfg.alpha, seed=cfg.seed, force=True)
    settings = {k: v for k, v in cfg.to_json().items()}
    if settings.get("round_timeout") is None:
        settings["round_timeout"] = 300.0
    app = write_app(work / "app", train_config=settings, client_data="node", out=str(out), force=True)
    timings = {"data_and_app": time.monotonic() - t0}
    fed = LocalFederation(work / "federation", [f'data="{p}" partition-id={c}' for c, p in enumerate(shards)])
    try:
        t0 = time.monotonic()
        fed.start(timeout=120)
        timings["federation_up"] = time.monotonic() - t0
        timings.update({f"federation_{k}": v for k, v in fed.timings.items()})
        t0 = time.monotonic()
        code = fed.run(app, timeout=timeout, progress=True)
        timings["run"] = time.monotonic() - t0
    finally:
        fed.stop()
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    if code != 0 or not metrics.get("final"):
        raise RuntimeError(f"the run ended without final metrics (flwr run exit code {code}); "
                           f"logs in {fed.work / 'logs'}")
    first = metrics["rounds"][0]["seconds"] if metrics["rounds"] else 0.0
    timings["first_round"] = first
    return metrics, timings
