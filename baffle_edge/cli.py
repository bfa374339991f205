"""The ``baffle-edge`` command line."""
from __future__ import annotations

import argparse
import re
import dataclasses
import sys
import time
from pathlib import Path

from . import __version__
from .errors import CommandError, did_you_mean

DEFAULTS_NOTE = "defaults follow the BAFFLE reference setup (arXiv 2301.12195) unless noted"


from .train_options import add_train_args, config_from_args


def cmd_train(a: argparse.Namespace) -> int:
    from .simulate import Method, train
    cfg = config_from_args(a)
    out = Path(a.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model}-{cfg.dataset}")
    m = train(cfg, out, resume=a.resume, progress=not a.no_progress)
    f = m["final"]
    print(f"{cfg.method.value}: test accuracy {100 * f['test_accuracy']:.2f}% after {f['rounds_done']} rounds "
          f"({f['seconds_total']:.0f} s; {f['rejected_reports']} rejected reports) -> {out}")
    if a.compare_bp and cfg.method is Method.BAFFLE:
        bp_cfg = dataclasses.replace(cfg, method=Method.BP)
        bp = train(bp_cfg, out / "bp", resume=a.resume and (out / "bp" / "checkpoint.pt").exists(),
                   progress=not a.no_progress)
        from .plots import plot_curves
        from .config import run_choices
        ch = run_choices(cfg)
        noise = f"{ch.noise.value} noise, "
        spend = f"{ch.forward_budget:g} forward-equivalents" if ch.forward_budget is not None else f"K={ch.k}"
        plot_curves({"baffle": m["rounds"], "bp": bp["rounds"]}, out / "curves.png",
                    title=f"{cfg.model} on {cfg.dataset}: BAFFLE ({noise}{spend}) vs backprop")
        print(f"bp: test accuracy {100 * bp['final']['test_accuracy']:.2f}% -> {out / 'bp'}"
              f" (side by side: baffle-edge compare {out} {out / 'bp'})")
    print(f"curves: {out / 'curves.png'}")
    return 0


# Sub-commands that live in their own modules: each module defines ``add_parser(subparsers)``,
# which registers its parser(s) (named here) and sets ``func`` (returning the exit code). A module whose
# dependencies this install lacks (a device install has no torch) gets stand-in parsers that say what to install.
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "baffle_edge.export.cli": ("export",),
    "baffle_edge.runtimes.cli": ("runtimes",),
    "baffle_edge.flower.cli": ("flower",),
    "baffle_edge.verify": ("verify",),
    "baffle_edge.bench_report": ("bench-report",),
    "baffle_edge.compare": ("compare",),
    "baffle_edge.conformance": ("conformance",),
    "baffle_edge.kit": ("check-kit",),
    "baffle_edge.gateway.cli": ("serve", "tokens", "device"),
}
SERVER_INSTALL = "pip install torch==2.13.0 && pip install 'baffle-edge[server]'"
SERVER_MODULES = ("torch", "onnx", "sklearn", "matplotlib", "tqdm", "psutil")  # what [server] installs


def _unavailable(sub, names: tuple[str, ...], error: ImportError) -> None:
    """Parsers for commands whose module cannot be imported here: running one explains why."""
    why = f"needs {error.name or error}, which this install lacks: {SERVER_INSTALL}"

    def fail(a: argparse.Namespace) -> int:
        raise ImportError(f"`baffle-edge {a.command}` {why}")
    for name in names:
        p = sub.add_parser(name, help=f"(unavailable in this install: {why})", add_help=False,
                           prefix_chars="\0")  # every argument (--help too) is taken as a plain word
        p.add_argument("rest", nargs="*")
        p.set_defaults(func=fail)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser (and, by inheritance, every sub-command's parser) that refuses an unknown
    argument itself: the error shows the sub-command's usage, not the top level's, and suggests the
    closest option (``--demo-date``: did you mean --demo-data?)."""

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        if extras:
            known = [o for a in self._actions for o in a.option_strings]
            word = extras[0].split("=", 1)[0]
            hint = did_you_mean(word, known) if word.startswith("-") else ""
            self.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return ns, extras

    def error(self, message: str):
        """argparse's error, with a suggestion for a mistyped choice (``baffle-edge serv``: did you mean serve?)."""
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            message += did_you_mean(m.group(1), re.findall(r"'([^']*)'", m.group(2)))
        super().error(message)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug`` on ``parser`` and on every sub-command parser below it (so it may follow the command)."""
    for action in parser._actions:  # argparse offers no public walk of its sub-parsers
        if not isinstance(action.choices, dict):
            continue
        for child in action.choices.values():
            if isinstance(child, argparse.ArgumentParser) and "-" in child.prefix_chars:
                if "--debug" not in child._option_string_actions:
                    child.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
                add_debug_flag(child)


DEBUG_HELP = "show the traceback of an error (default: one `error:` line)"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="baffle-edge", description=(
        "Backpropagation-free federated learning (BAFFLE) on edge inference runtimes. " + DEFAULTS_NOTE + "."))
    p.add_argument("--version", action="version", version=f"baffle-edge {__version__}")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    t = sub.add_parser("train", help="federated training in one process (BAFFLE or the backprop baseline)",
                       description="Train a model with C simulated clients. Writes OUT/metrics.json, "
                                   "OUT/curves.png and OUT/checkpoint.pt.")
    add_train_args(t)
    t.set_defaults(func=cmd_train)
    import importlib
    for mod, names in COMMAND_MODULES.items():
        try:
            module = importlib.import_module(mod)
        except ImportError as e:
            _unavailable(sub, names, e)
            continue
        module.add_parser(sub)
    add_debug_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "func", None):
        parser.print_help()
        return 2
    try:
        return a.func(a)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, CommandError) as e:
        if a.debug:
            raise
        hint = (f" (the server side is an extra: {SERVER_INSTALL})"
                if isinstance(e, ImportError) and e.name in SERVER_MODULES else "")
        print(f"baffle-edge {a.command}: error: {e}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"baffle-edge {a.command}: interrupted (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
