"""``baffle-edge runtimes``: which backends are importable here, their providers, the extra to install."""
from __future__ import annotations

import importlib


def describe() -> list[dict]:
    from . import REGISTRY
    rows = []
    for name, info in sorted(REGISTRY.items()):
        row = {"name": name, "summary": info.summary, "domain": info.domain, "artifact": info.artifact,
               "format": info.format, "available": True, "detail": ""}
        try:
            for mod in info.requires:
                importlib.import_module(mod)
        except ImportError as e:
            row["available"] = False
            row["detail"] = f"missing {e.name or e}: pip install " + (
                f"'baffle-edge[{info.extra}]'" if info.extra else " ".join(info.requires))
        else:
            if info.engine == "onnxruntime":
                from .onnxruntime_runtime import available_providers, plugin_providers
                row["detail"] = "providers: " + ", ".join(available_providers()) + (
                    "; plugin EPs: " + ", ".join(plugin_providers()) if plugin_providers() else "")
            elif info.engine == "litert":
                row["detail"] = ("delegates: builtin (in-place weight writes); xnnpack for plain inference only; "
                                 "block rows: the bundle's segment models")
            elif name == "torch":
                import torch
                row["detail"] = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
        rows.append(row)
    return rows


def placement_report(bundle: str, provider: str, batch: int, runtime: str = "onnxruntime-int8") -> dict:
    """Where ``bundle``'s train graph runs on plugin EP ``provider`` at ``batch`` (docs/npu.md): the placement
    by nodes and MACs and the weight inputs consumed on CPU, after the write-check of every weight input
    (at seeded random weights and inputs: all-zero ones would hide a weight's effect)."""
    import numpy as np

    from . import get_runtime
    from .plugin_eps import PLUGINS
    if provider not in PLUGINS:
        raise ValueError(f"--placement needs a plugin EP --provider ({', '.join(PLUGINS)}), not {provider!r}")
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, not {batch}")
    session = get_runtime(runtime, provider=provider).load(bundle)
    rng = np.random.default_rng(0)  # the write-check needs a signal: seeded random weights N(0, 0.1) and inputs
    session.set_weights(rng.normal(0, 0.1, session.dim).astype(np.float32))
    session.prepare(rng.random((batch, *session.bundle.input_shape), dtype=np.float32))
    return session.placement.to_json()


def cmd_runtimes(a) -> int:
    if a.placement:
        import json
        report = placement_report(a.placement, a.provider, a.batch)
        if a.json:
            print(json.dumps(report, indent=1))
            return 0
        print(f"{a.placement} on {a.provider} (batch {a.batch}): {report['on_device']}/{report['nodes']} nodes, "
              f"{report['macs_on_device']}/{report['macs']} MACs ({100 * report['device_mac_share']:.1f}%) on the device")
        for name, (macs, where) in report["mac_nodes"].items():
            print(f"  {where:10s} {macs:>12d} MACs  {name}")
        print("  on CPU: " + (", ".join(report["on_cpu"]) or "nothing"))
        print("  perturbed tensors consumed on CPU: " + (", ".join(report["weights_consumed_on_cpu"]) or "none"))
        return 0
    rows = describe()
    if a.json:
        import json
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        mark = "yes" if r["available"] else "NO "
        print(f"{r['name']:18s} {mark}  {r['domain']:9s} {r['summary']}")
        print(f"{'':23s}{r['detail']}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("runtimes", help="list client runtimes, whether they work here, and how to enable them")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--placement", metavar="BUNDLE", help="instead: where BUNDLE's int8 train graph runs on the plugin "
                   "EP --provider, by nodes and MACs, and which perturbed tensors are consumed on CPU (docs/npu.md)")
    p.add_argument("--provider", default="qnn-htp", help="plugin EP for --placement (default: %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="static batch for --placement (default: %(default)s)")
    p.set_defaults(func=cmd_runtimes)
