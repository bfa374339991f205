"""``baffle-edge flower simulate``: a run on Flower's simulation runtime (a loopback SuperLink in
simulation mode and ``flwr run`` with one virtual SuperNode per client).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .appfolder import write_app
from .processes import flower_env, flwr_home, follow, free_port, start_process, superlink_command, wait_healthy


def simulate(cfg, out: str | Path, *, resume: bool = False, cpus_per_client: int = 1,
             total_cpus: int | None = None, verbose: bool = False, timeout: float | None = None) -> dict:
    """Run ``cfg`` on Flower's simulation runtime, the supported path in Flower 1.42: a SuperLink
    in simulation mode (loopback only, started and stopped here) and ``flwr run`` of the app
    folder with ``num-supernodes = cfg.clients`` virtual SuperNodes (Ray). Returns the metrics."""
    import shutil
    import sys

    from .records import require_flwr
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
