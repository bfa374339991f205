"""PNG figures (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path) -> Path:
    """Lay out, write as PNG (110 dpi) and free a matplotlib figure."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_curves(runs: dict[str, list[dict]], path: Path, *, title: str = "") -> Path:
    """Test accuracy and train loss vs round, one line per run (e.g. baffle and bp)."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in runs.items():
        ev = [r for r in rows if "test_accuracy" in r]
        ax1.plot([r["round"] for r in ev], [100 * r["test_accuracy"] for r in ev], label=name)
        tl = [r for r in rows if r.get("train_loss") is not None]
        ax2.plot([r["round"] for r in tl], [r["train_loss"] for r in tl], label=name, alpha=0.8)
    ax1.set(xlabel="round", ylabel="test accuracy (%)", title="accuracy")
    ax2.set(xlabel="round", ylabel="mean client loss at w (train batches)", title="train loss")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
