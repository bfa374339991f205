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


def cmd_runtimes(a) -> int:
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
    p.set_defaults(func=cmd_runtimes)
