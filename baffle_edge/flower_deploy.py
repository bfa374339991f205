"""Deploying BAFFLE on Flower: the app folder, TLS certificates, SuperNode keys, per-node data.

Everything a SuperLink/SuperNode federation needs besides the apps themselves
(``flower_app.py``), as functions and ``baffle-edge flower ...`` commands (docs/flower.md):

- ``write_app(dir)``: a ready Flower app folder (``pyproject.toml`` with the components and the
  run config) for ``flwr run``;
- ``make_certificates(dir, hosts)``: a private CA and a SuperLink certificate signed by it
  (``ca.crt`` goes to every SuperNode and to the machine running ``flwr``);
- ``make_node_keys(dir, n)``: EC P-384 key pairs in OpenSSH format, as Flower's SuperNode
  authentication expects (the SuperLink admin registers the ``.pub`` files with
  ``flwr supernode register``; each SuperNode keeps its private key);
- ``write_shards(cfg, dir)``: one data file per node (the same partition as ``baffle-edge train``),
  for tests and for users who want to try a federation before devices have their own data;
- ``load_node_data(path)``: what a SuperNode's ``--node-config 'data=PATH'`` points at.

The node data formats are those ``data.py`` reads: an ``.npz`` with ``x`` (raw pixels, uint8,
(N, C, H, W) or (N, H, W)) and ``y`` (labels), or a folder with MNIST-style IDX files
``train-images-idx3-ubyte`` / ``train-labels-idx1-ubyte`` (optionally ``.gz``). Pixels are raw:
the node normalises them with the server's normalisation (sent with each task), as an app would.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------------- app folder

APP_NAME = "baffle-flower"

PYPROJECT = """\
# A Flower app running BAFFLE (written by `baffle-edge flower app`; docs/flower.md).
# Needs baffle-edge[flower] installed wherever the ServerApp and the ClientApps run.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "BAFFLE (backpropagation-free federated learning) on Flower"
license = "Apache-2.0"
dependencies = ["baffle-edge[flower]"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "baffle-edge"

[tool.flwr.app.components]
serverapp = "baffle_edge.flower_app:server_app"
clientapp = "baffle_edge.flower_app:client_app"

[tool.flwr.app.config]
# The training run, as a TrainConfig in JSON (the fields of metrics.json "config"; missing fields
# take their defaults; `baffle-edge train --help` documents each one).
train-config = '{train_config}'
# Where each client's data comes from: "node" = the SuperNode's own file, given when it starts
# (--node-config 'data="PATH" partition-id=C'); "shard" = shard C of the dataset above (simulation).
client-data = "{client_data}"
# Run folder on the machine running the ServerApp (the SuperLink's): metrics.json, checkpoint.pt.
# A relative path is relative to the folder the SuperLink was started in.
out = {out}
# Wait for this many SuperNodes before round 1, at most node-wait seconds.
min-nodes = {min_nodes}
node-wait = {node_wait}
# Continue the run in `out` from its checkpoint.
resume = false
"""


def write_app(directory: str | Path, *, train_config: dict | None = None, client_data: str = "node",
              out: str = "runs/flower", min_nodes: int | None = None, node_wait: float = 600.0,
              force: bool = False) -> Path:
    """Write a Flower app folder (``pyproject.toml`` + a README) and return its path.

    ``train_config`` is a (partial) TrainConfig JSON; it is validated here so a typo fails now,
    not on the SuperLink."""
    from .flower_app import FlowerConfig, config_from_run_config
    d = Path(directory)
    if (d / "pyproject.toml").exists() and not force:
        raise FileExistsError(f"{d / 'pyproject.toml'} exists; pass --force to replace it")
    if client_data not in ("node", "shard"):
        raise ValueError(f"client-data must be 'node' or 'shard', got {client_data!r}")
    given = json.dumps(train_config or {}, separators=(",", ":"))
    if "'" in given:
        raise ValueError("train-config must not contain single quotes (it is written as a TOML literal string)")
    cfg, _ = config_from_run_config({"train-config": given})  # ValueError on unknown fields / bad values
    min_nodes = cfg.clients if min_nodes is None else min_nodes
    FlowerConfig(min_nodes=min_nodes, node_wait=node_wait)  # validates
    d.mkdir(parents=True, exist_ok=True)
    text = PYPROJECT.format(name=APP_NAME, train_config=given, client_data=client_data,
                            out=json.dumps(Path(out).as_posix()), min_nodes=min_nodes, node_wait=node_wait)
    (d / "pyproject.toml").write_text(text)
    (d / "README.md").write_text(
        "# BAFFLE on Flower\n\nWritten by `baffle-edge flower app`. Run it with `flwr run . CONNECTION`\n"
        "against a SuperLink (docs/flower.md in baffle-edge). Edit `[tool.flwr.app.config]` in\n"
        "pyproject.toml, or override at submit time: `flwr run . CONN --run-config 'out=\"runs/x\"'`.\n")
    return d


# ----------------------------------------------------------------------------------- TLS and keys

def make_certificates(directory: str | Path, hosts: list[str], *, days: int = 365, force: bool = False) -> dict:
    """A private CA (``ca.crt``, ``ca.key``) and a SuperLink server certificate (``server.pem``,
    ``server.key``) valid for ``hosts`` (DNS names or IP addresses, as SuperNodes and ``flwr``
    will address the SuperLink). Keys are EC P-384; private keys are written mode 0600."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise ValueError("give at least one host name or IP address the SuperLink is reached at")
    d = Path(directory)
    files = {n: d / n for n in ("ca.crt", "ca.key", "server.pem", "server.key")}
    if any(p.exists() for p in files.values()) and not force:
        raise FileExistsError(f"certificates exist in {d}; pass --force to replace them")
    sans: list = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", h):
                raise ValueError(f"not a host name or IP address: {h!r}") from None
            sans.append(x509.DNSName(h))
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "baffle-edge Flower CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    d.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    _write_private(files["ca.key"], ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    _write_private(files["server.key"], key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    files["ca.crt"].write_bytes(ca.public_bytes(pem))
    files["server.pem"].write_bytes(cert.public_bytes(pem))
    return files


def make_node_keys(directory: str | Path, names: list[str], *, force: bool = False) -> dict[str, tuple[Path, Path]]:
    """One EC P-384 key pair per SuperNode name, in OpenSSH format (``NAME`` private, mode 0600;
    ``NAME.pub`` public): what ``flower-supernode --auth-supernode-private-key`` and
    ``flwr supernode register`` read."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    d = Path(directory)
    out = {}
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
            raise ValueError(f"key name {name!r}: use letters, digits, '_', '-', '.'")
        priv, pub = d / name, d / f"{name}.pub"
        if (priv.exists() or pub.exists()) and not force:
            raise FileExistsError(f"{priv} exists; pass --force to replace it")
        out[name] = (priv, pub)
    d.mkdir(parents=True, exist_ok=True)
    for name, (priv, pub) in out.items():
        key = ec.generate_private_key(ec.SECP384R1())
        _write_private(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                               serialization.NoEncryption()))
        pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                      serialization.PublicFormat.OpenSSH) + f" {name}\n".encode())
    return out


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


# ----------------------------------------------------------------------------------- node data

IDX_IMAGES, IDX_LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"


def load_node_data(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A SuperNode's own samples: raw pixels (N, C, H, W) and int64 labels (N,).

    ``path``: an ``.npz`` with arrays ``x`` (N, C, H, W) or (N, H, W) and ``y`` (N,) (read without
    pickle), or a folder with ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte`` (IDX, as
    MNIST ships; ``.gz`` accepted)."""
    from .data import read_idx
    p = Path(path)
    if p.is_dir():
        x, y = read_idx(p / IDX_IMAGES), read_idx(p / IDX_LABELS)
    elif p.is_file():
        try:
            with np.load(p, allow_pickle=False) as z:
                names = sorted(z.files)
                x, y = (z["x"], z["y"]) if {"x", "y"} <= set(names) else (None, None)
        except Exception as e:  # not a zip, truncated, object arrays (pickle refused)
            raise ValueError(f"{p}: not a readable .npz of x, y ({type(e).__name__}: {e})") from None
        if x is None:
            raise ValueError(f"{p}: expected arrays 'x' and 'y', found {names}")
    else:
        raise FileNotFoundError(f"node data {p} does not exist (give an .npz file or a folder of IDX files)")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"{p}: x must be numeric (N, C, H, W) or (N, H, W), got {x.dtype} {x.shape}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or len(y) != len(x) or len(y) == 0:
        raise ValueError(f"{p}: y must be N >= 1 integer labels matching x; got {y.dtype} {y.shape} for x {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{p}: x contains NaN or infinite values")
    return x, y.astype(np.int64)


def normalise(x_raw: np.ndarray, norm: dict, *, channels: int, size: int, where: str = "node data") -> np.ndarray:
    """Raw pixels -> model inputs with the server's normalisation, computed exactly as
    ``data._normalise`` does (float32), so a node's inputs equal the in-process ones bit for bit."""
    if x_raw.shape[1:] != (channels, size, size):
        raise ValueError(f"{where}: images are {x_raw.shape[1:]} but the model expects ({channels}, {size}, {size})")
    mean = np.asarray(norm["mean"], dtype=np.float32)[None, :, None, None]
    std = np.asarray(norm["std"], dtype=np.float32)[None, :, None, None]
    if mean.size != channels or std.size != channels:
        raise ValueError(f"normalisation has {mean.size} channel means for {channels}-channel images")
    x = x_raw.astype(np.float32) / float(norm["scale"])
    return ((x - mean) / std).astype(np.float32)


def raw_pixels(x: np.ndarray, mean, std, scale: float) -> np.ndarray:
    """Invert ``data._normalise`` (the datasets' pixels are integers) -> uint8."""
    m = np.asarray(mean, dtype=np.float64)[None, :, None, None]
    s = np.asarray(std, dtype=np.float64)[None, :, None, None]
    raw = (x.astype(np.float64) * s + m) * scale
    out = np.rint(raw)
    if np.abs(raw - out).max(initial=0) > 0.05 or out.min(initial=0) < 0 or out.max(initial=0) > 255:
        raise ValueError("these inputs do not come from 8-bit integer pixels")
    return out.astype(np.uint8)


def write_idx(path: Path, a: np.ndarray) -> None:
    """An unsigned-byte IDX file (the MNIST format ``data.read_idx`` reads)."""
    a = np.ascontiguousarray(a, dtype=np.uint8)
    header = bytes([0, 0, 0x08, a.ndim]) + np.asarray(a.shape, dtype=">u4").tobytes()
    path.write_bytes(header + a.tobytes())


def write_shards(out: str | Path, *, dataset: str = "digits", data_dir: str | None = None, clients: int = 10,
                 partition: str = "iid", alpha: float = 0.5, seed: int = 0, fmt: str = "npz",
                 force: bool = False) -> list[Path]:
    """One data file per client (``client-C.npz`` or IDX folder ``client-C/``): the training samples
    ``baffle-edge train`` gives client C with the same dataset, clients, partition and seed, as raw
    8-bit pixels in partition order. A SuperNode started with ``data=`` one of them and
    ``partition-id=C`` trains exactly like client C in-process."""
    from .data import load_dataset, partition as split
    if fmt not in ("npz", "idx"):
        raise ValueError(f"format must be npz or idx, got {fmt!r}")
    d = Path(out)
    names = [d / (f"client-{c}.npz" if fmt == "npz" else f"client-{c}") for c in range(clients)]
    if any(p.exists() for p in names) and not force:
        raise FileExistsError(f"shards exist in {d}; pass --force to replace them")
    data = load_dataset(dataset, data_dir, seed=seed)
    parts = split(data.y_train, clients, scheme=partition, alpha=alpha, seed=seed)
    d.mkdir(parents=True, exist_ok=True)
    for c, (p, idx) in enumerate(zip(names, parts)):
        x = raw_pixels(data.x_train[idx], data.mean, data.std, data.scale)
        y = data.y_train[idx]
        if fmt == "npz":
            np.savez_compressed(p, x=x, y=y)
        else:
            p.mkdir(exist_ok=True)
            write_idx(p / IDX_IMAGES, x[:, 0] if x.shape[1] == 1 else x)
            write_idx(p / IDX_LABELS, y.astype(np.uint8))
    return names


# ----------------------------------------------------------------------------------- processes

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


# ----------------------------------------------------------------------------------- simulation

def simulate(cfg, out: str | Path, *, resume: bool = False, cpus_per_client: int = 1,
             total_cpus: int | None = None, verbose: bool = False, timeout: float | None = None) -> dict:
    """Run ``cfg`` on Flower's simulation runtime, the supported path in Flower 1.42: a SuperLink
    in simulation mode (loopback only, started and stopped here) and ``flwr run`` of the app
    folder with ``num-supernodes = cfg.clients`` virtual SuperNodes (Ray). Returns the metrics."""
    import shutil
    import sys
    from .flower_app import require_flwr
    require_flwr()
    out = Path(out).resolve()
    if not resume and out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder {out} is not empty; pass --resume to continue it or choose another --out")
    work = Path(tempfile.mkdtemp(prefix="baffle-flower-sim-"))
    superlink = None
    try:
        app = write_app(work / "app", train_config=cfg.to_json(), client_data="shard", out=str(out),
                        min_nodes=cfg.clients)
        port = free_port()
        home = flwr_home(work / "flwr-home", {"sim": {"address": f"127.0.0.1:{port}", "insecure": True}})
        federation = {"num_supernodes": cfg.clients, "client_resources_num_cpus": cpus_per_client,
                      "client_resources_num_gpus": 0.0, "init_args_num_cpus": total_cpus or os.cpu_count() or 1,
                      "init_args_log_to_driver": verbose, "verbose": verbose}
        env = flower_env(FLWR_HOME=str(home))
        superlink = start_process("SuperLink", superlink_command(port, simulation=True), work / "superlink.log",
                                  env=env)
        wait_healthy(f"127.0.0.1:{port}", ca=None, timeout=60, process=superlink)
        cmd = ["flwr", "run", str(app), "sim", "--stream", "--federation-config",
               " ".join(f"{k}={json.dumps(v)}" for k, v in federation.items())]
        if resume:
            cmd += ["--run-config", "resume=true"]
        code, tail = follow(cmd, env=env, timeout=timeout, verbose=verbose)
        metrics_path = out / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        if code != 0 or not metrics.get("final"):
            if not verbose:
                sys.stderr.write(tail[-4000:] + "\n")
            raise RuntimeError(f"the Flower simulation ended without final metrics (flwr run exit code "
                               f"{code}); SuperLink log:\n{superlink.tail(40)}")
        return metrics
    finally:
        if superlink is not None:
            superlink.stop()
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------- one machine

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


# ----------------------------------------------------------------------------------- commands

def _train_config_json(a) -> dict:
    """The TrainConfig the train options describe, as JSON with only the fields that differ from
    the defaults (so the app folder reads like the command that made it)."""
    from .cli import config_from_args
    from .simulate import TrainConfig
    full, default = config_from_args(a).to_json(), TrainConfig().to_json()
    out = {k: v for k, v in full.items() if k != "optim" and v != default[k]}
    optim = {k: v for k, v in full["optim"].items() if v != default["optim"][k]}
    if optim:
        out["optim"] = optim
    return out


def cmd_app(a) -> int:
    if a.round_timeout is None:
        a.round_timeout = 300.0  # a deployment must not wait forever for a vanished SuperNode
    cfg = _train_config_json(a)
    d = write_app(a.dir, train_config=cfg, client_data=a.client_data, out=a.out or "runs/flower",
                  min_nodes=a.min_nodes, node_wait=a.node_wait, force=a.force)
    print(f"Flower app written to {d}/pyproject.toml ({len(cfg)} non-default train settings, client data: "
          f"{a.client_data}). Run it: flwr run {d} CONNECTION --stream (docs/flower.md)")
    return 0


def cmd_certs(a) -> int:
    files = make_certificates(a.dir, [h.strip() for h in a.hosts.split(",") if h.strip()], days=a.days, force=a.force)
    print(f"CA: {files['ca.crt']} (give it to every SuperNode and flwr user), {files['ca.key']} (keep offline)\n"
          f"SuperLink: {files['server.pem']} + {files['server.key']} for hosts {a.hosts}")
    return 0


def cmd_keys(a) -> int:
    names = [n.strip() for n in a.names.split(",") if n.strip()] if a.names else [f"node-{i}" for i in range(a.nodes)]
    pairs = make_node_keys(a.dir, names, force=a.force)
    for name, (priv, pub) in pairs.items():
        print(f"{name}: private {priv} (stays on the SuperNode), public {pub} (register: flwr supernode register {pub})")
    return 0


def cmd_shards(a) -> int:
    paths = write_shards(a.dir, dataset=a.dataset, data_dir=a.data_dir, clients=a.clients, partition=a.partition,
                         alpha=a.alpha, seed=a.seed, fmt=a.format, force=a.force)
    print(f"{len(paths)} node data files in {a.dir} ({a.format}); start SuperNode C with "
          f"--node-config 'data=\"{paths[0].parent.resolve()}/{paths[0].name.replace('-0', '-C')}\" partition-id=C'")
    return 0



def _pace(final: dict, wall: float) -> str:
    """Rounds and rounds/minute of a finished run, with and without start-up."""
    n = final["rounds_done"]
    return (f"{n} rounds in {wall:.0f} s ({60 * n / wall:.1f} rounds/min incl. start-up; "
            f"{60 * n / max(final['seconds_total'], 1e-9):.1f} rounds/min in rounds)")

def cmd_simulate(a) -> int:
    from .cli import config_from_args
    cfg = config_from_args(a)
    out = Path(a.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-flower-{cfg.model}-{cfg.dataset}")
    start = time.perf_counter()
    m = simulate(cfg, out, resume=a.resume, cpus_per_client=a.cpus_per_client, verbose=a.verbose,
                 timeout=a.timeout)
    wall = time.perf_counter() - start
    f = m["final"]
    print(f"flower: {cfg.clients} clients, {_pace(f, wall)}; test accuracy {100 * f['test_accuracy']:.2f}%; "
          f"{f['rejected_reports']} rejected, {f['absent_reports']} absent, {f['skipped_rounds']} skipped rounds "
          f"-> {out}")
    return 0


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


def cmd_local(a) -> int:
    import shutil
    from .cli import config_from_args
    cfg = config_from_args(a)
    out = Path(a.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-flower-local-{cfg.model}-{cfg.dataset}")
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="baffle-flower-local-"))
    start = time.perf_counter()
    try:
        m, t = run_local(cfg, out, work=work, timeout=a.timeout)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - start
    f = m["final"]
    print(f"flower deployment: {cfg.clients} SuperNodes (TLS, authenticated), {_pace(f, wall)}; start-up: "
          f"federation {t['federation_up']:.1f} s, first round {t['first_round']:.1f} s; test accuracy "
          f"{100 * f['test_accuracy']:.2f}%; {f['rejected_reports']} rejected, {f['absent_reports']} absent -> {out}")
    return 0


def add_parser(subparsers) -> None:
    from .cli import _add_train_args
    p = subparsers.add_parser("flower", help="run BAFFLE on the Flower framework (pip install 'baffle-edge[flower]')",
                              description="Federated BAFFLE over Flower: simulation, or a SuperLink with SuperNodes "
                                          "on several machines (docs/flower.md is the runbook).")
    sub = p.add_subparsers(dest="flower_command", metavar="FLOWER_COMMAND", required=True)

    s = sub.add_parser("app", help="write a ready Flower app folder (pyproject.toml with components and config)",
                       description="Write DIR/pyproject.toml: the BAFFLE ServerApp and ClientApp and the run "
                                   "config made from the train options below. Submit it with `flwr run DIR CONN`.")
    s.add_argument("dir", help="the app folder to write")
    s.add_argument("--client-data", default="node", choices=["node", "shard"],
                   help="node: each SuperNode trains on its own --node-config data file; shard: on shard C of "
                        "--dataset (simulation) (default: node)")
    s.add_argument("--min-nodes", type=int, default=None, help="SuperNodes to wait for before round 1 (default: --clients)")
    s.add_argument("--node-wait", type=float, default=600.0, help="seconds to wait for them (default: 600)")
    s.add_argument("--force", action="store_true", help="replace an existing pyproject.toml")
    _add_train_args(s)
    s.set_defaults(func=cmd_app, command="flower app")
    for action in s._actions:  # the run folder lives on the ServerApp's machine; a deployment needs a deadline
        if action.dest == "out":
            action.help = "run folder on the SuperLink machine, where the ServerApp runs (default: runs/flower)"
        if action.dest == "round_timeout":
            action.help = "seconds a round waits for reports; late clients are absent (default here: 300)"

    s = sub.add_parser("certs", help="make a private CA and the SuperLink's TLS certificate",
                       description="Write ca.crt, ca.key, server.pem, server.key (EC P-384) into DIR.")
    s.add_argument("dir")
    s.add_argument("--hosts", required=True,
                   help="comma-separated DNS names / IP addresses SuperNodes and flwr use to reach the SuperLink")
    s.add_argument("--days", type=int, default=365, help="validity (default: 365)")
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=cmd_certs, command="flower certs")

    s = sub.add_parser("keys", help="make SuperNode authentication key pairs (EC P-384, OpenSSH format)",
                       description="Write NAME (private) and NAME.pub (public) per SuperNode into DIR.")
    s.add_argument("dir")
    s.add_argument("--nodes", type=int, default=1, help="how many pairs, named node-0 .. (default: 1)")
    s.add_argument("--names", default=None, help="comma-separated names instead of node-0..")
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=cmd_keys, command="flower keys")

    s = sub.add_parser("shards", help="write one data file per client (the in-process partition) for SuperNodes",
                       description="Split --dataset as `baffle-edge train` does and write client-C.npz (or IDX "
                                   "folders) of raw pixels and labels: the data a SuperNode's --node-config points at.")
    s.add_argument("dir")
    from .data import DATASETS
    s.add_argument("--dataset", default="digits", choices=DATASETS)
    s.add_argument("--data-dir", default=None)
    s.add_argument("--clients", type=int, default=10)
    s.add_argument("--partition", default="iid", choices=["iid", "dirichlet"])
    s.add_argument("--alpha", type=float, default=0.5)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--format", default="npz", choices=["npz", "idx"])
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=cmd_shards, command="flower shards")

    s = sub.add_parser("local", help="the whole secured deployment on this machine: SuperLink + one SuperNode "
                                     "per client as processes",
                       description="Try the runbook (docs/flower.md) on one machine: node data files, a private CA, "
                                   "SuperNode keys, a SuperLink with TLS and SuperNode authentication on 127.0.0.1, "
                                   "--clients SuperNodes each on its own data file, the app, `flwr run`; every process "
                                   "is stopped at the end. Writes OUT/metrics.json like `baffle-edge train`.")
    _add_train_args(s)
    g = s.add_argument_group("flower")
    g.add_argument("--work", default=None, help="keep certificates, keys, data, app and logs here (default: a "
                                                 "temporary folder, removed at the end)")
    g.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds (default: 3600)")
    s.set_defaults(func=cmd_local, command="flower local")

    s = sub.add_parser("simulate", help="Flower's simulation runtime with --clients virtual SuperNodes",
                       description="Train on Flower's simulation runtime (a loopback SuperLink in simulation mode, "
                                   "`flwr run`, Ray): one virtual SuperNode per client. Writes the same "
                                   "OUT/metrics.json as `baffle-edge train`.")
    _add_train_args(s)
    g = s.add_argument_group("flower")
    g.add_argument("--cpus-per-client", type=int, default=1,
                   help="Ray CPUs per ClientApp instance (an integer in Flower 1.42); concurrency = cores / this "
                        "(default: 1)")
    g.add_argument("--timeout", type=float, default=None, help="give up after this many seconds (default: none)")
    g.add_argument("--verbose", action="store_true", help="stream Flower's and Ray's logs")
    s.set_defaults(func=cmd_simulate, command="flower simulate")
