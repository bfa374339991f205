"""``baffle-edge flower app|certs|keys|shards|local|simulate`` (docs/flower.md is the runbook)."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .appfolder import write_app
from .credentials import make_certificates, make_node_keys
from .federation import run_local
from .nodedata import write_shards
from .simulation import simulate


def _train_config_json(a) -> dict:
    """The TrainConfig the train options describe, as JSON with only the fields that differ from
    the defaults (so the app folder reads like the command that made it)."""
    from ..train_options import config_from_args
    from ..simulate import TrainConfig
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
    from ..train_options import config_from_args
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


def cmd_local(a) -> int:
    import shutil

    from ..train_options import config_from_args
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
    """``baffle-edge flower``: one sub-command per step of the runbook, and the two ways to run it."""
    p = subparsers.add_parser("flower", help="run BAFFLE on the Flower framework (pip install 'baffle-edge[flower]')",
                              description="Federated BAFFLE over Flower: simulation, or a SuperLink with SuperNodes "
                                          "on several machines (docs/flower.md is the runbook).")
    sub = p.add_subparsers(dest="flower_command", metavar="FLOWER_COMMAND", required=True)
    for add in (_add_app, _add_certs, _add_keys, _add_shards, _add_local, _add_simulate):
        add(sub)


def _add_app(sub) -> None:
    from ..train_options import add_train_args
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
    add_train_args(s)
    s.set_defaults(func=cmd_app, command="flower app")
    for action in s._actions:  # the run folder lives on the ServerApp's machine; a deployment needs a deadline
        if action.dest == "out":
            action.help = "run folder on the SuperLink machine, where the ServerApp runs (default: runs/flower)"
        if action.dest == "round_timeout":
            action.help = "seconds a round waits for reports; late clients are absent (default here: 300)"


def _add_certs(sub) -> None:
    s = sub.add_parser("certs", help="make a private CA and the SuperLink's TLS certificate",
                       description="Write ca.crt, ca.key, server.pem, server.key (EC P-384) into DIR.")
    s.add_argument("dir")
    s.add_argument("--hosts", required=True,
                   help="comma-separated DNS names / IP addresses SuperNodes and flwr use to reach the SuperLink")
    s.add_argument("--days", type=int, default=365, help="validity (default: 365)")
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=cmd_certs, command="flower certs")


def _add_keys(sub) -> None:
    s = sub.add_parser("keys", help="make SuperNode authentication key pairs (EC P-384, OpenSSH format)",
                       description="Write NAME (private) and NAME.pub (public) per SuperNode into DIR.")
    s.add_argument("dir")
    s.add_argument("--nodes", type=int, default=1, help="how many pairs, named node-0 .. (default: 1)")
    s.add_argument("--names", default=None, help="comma-separated names instead of node-0..")
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=cmd_keys, command="flower keys")


def _add_shards(sub) -> None:
    from ..data import DATASETS
    s = sub.add_parser("shards", help="write one data file per client (the in-process partition) for SuperNodes",
                       description="Split --dataset as `baffle-edge train` does and write client-C.npz (or IDX "
                                   "folders) of raw pixels and labels: the data a SuperNode's --node-config points at.")
    s.add_argument("dir")
    s.add_argument("--dataset", default="digits", choices=DATASETS)
    s.add_argument("--data-dir", default=None)
    s.add_argument("--clients", type=int, default=10)
    s.add_argument("--partition", default="iid", choices=["iid", "dirichlet"])
    s.add_argument("--alpha", type=float, default=0.5)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--format", default="npz", choices=["npz", "idx"])
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=cmd_shards, command="flower shards")


def _add_local(sub) -> None:
    from ..train_options import add_train_args
    s = sub.add_parser("local", help="the whole secured deployment on this machine: SuperLink + one SuperNode "
                                     "per client as processes",
                       description="Try the runbook (docs/flower.md) on one machine: node data files, a private CA, "
                                   "SuperNode keys, a SuperLink with TLS and SuperNode authentication on 127.0.0.1, "
                                   "--clients SuperNodes each on its own data file, the app, `flwr run`; every process "
                                   "is stopped at the end. Writes OUT/metrics.json like `baffle-edge train`.")
    add_train_args(s)
    g = s.add_argument_group("flower")
    g.add_argument("--work", default=None, help="keep certificates, keys, data, app and logs here (default: a "
                                                 "temporary folder, removed at the end)")
    g.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds (default: 3600)")
    s.set_defaults(func=cmd_local, command="flower local")


def _add_simulate(sub) -> None:
    from ..train_options import add_train_args
    s = sub.add_parser("simulate", help="Flower's simulation runtime with --clients virtual SuperNodes",
                       description="Train on Flower's simulation runtime (a loopback SuperLink in simulation mode, "
                                   "`flwr run`, Ray): one virtual SuperNode per client. Writes the same "
                                   "OUT/metrics.json as `baffle-edge train`.")
    add_train_args(s)
    g = s.add_argument_group("flower")
    g.add_argument("--cpus-per-client", type=int, default=1,
                   help="Ray CPUs per ClientApp instance (an integer in Flower 1.42); concurrency = cores / this "
                        "(default: 1)")
    g.add_argument("--timeout", type=float, default=None, help="give up after this many seconds (default: none)")
    g.add_argument("--verbose", action="store_true", help="stream Flower's and Ray's logs")
    s.set_defaults(func=cmd_simulate, command="flower simulate")
