"""The batching both torch incremental forwards share (chains: torch_incremental.py, WideResNet: torch_residual.py):
block rows grouped by their module and evaluated in chunks that bound the temporaries."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from baffle_edge.perturb import BlockTable

CHUNK_ELEMENTS = 1 << 22  # activation elements per batched call (bounds the temporaries, ~16 MB float32)


def module_rows(table: BlockTable, blocks: np.ndarray, values: list[np.ndarray], shape: tuple[int, ...],
                chunk: Callable[[int], int], run: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]) -> np.ndarray:
    """Logits [n, *shape] of the rows replacing block ``blocks[i]``'s values by ``values[i]``: per module m, chunks of
    ``chunk(m)`` rows, ``run(m, channels, values)`` giving a chunk's logits (channels [r], values [r, fan_in + 1])."""
    blocks = np.asarray(blocks)
    out = np.empty((len(blocks), *shape), dtype=np.float32)
    modules = table.module[blocks]
    for m in np.unique(modules):
        m = int(m)
        rows = np.flatnonzero(modules == m)
        step = max(1, chunk(m))
        for s in range(0, rows.size, step):
            r = rows[s:s + step]
            out[r] = run(m, torch.from_numpy(table.row[blocks[r]]), torch.from_numpy(np.stack([values[j] for j in r]))).numpy()
    return out
