"""Padded token batches for the language-model tests, and the loss over their valid tokens.

One definition, shared by the one-process and the multi-rank tests of counted accumulation
(``accumulate(count=...)``). Imported as ``tests.batches`` (the launcher hands ``sys.path`` to
the ranks it starts, so functions that ranks run may use it too).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.nn import functional as F

__all__ = ["IGNORE", "padded_token_batches", "token_loss"]

IGNORE = -100  # the label of a padding token: cross_entropy's default ignore_index


def padded_token_batches(valid: Sequence[Sequence[int]], *, vocab: int, tokens: int,
                         seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """One batch per entry of ``valid``: a row per number ``v`` in it, ``tokens`` random ids
    below ``vocab`` whose first ``v`` labels are valid and the rest `IGNORE`.

    Example: ``padded_token_batches([[3, 0]], vocab=11, tokens=6)`` is one batch of two rows,
    with 3 valid labels in the first row and none in the second.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows in valid:
        ids = torch.randint(0, vocab, (len(rows), tokens), generator=g)
        labels = torch.randint(0, vocab, (len(rows), tokens), generator=g)
        for r, v in enumerate(rows):
            labels[r, v:] = IGNORE
        out.append({"ids": ids, "labels": labels})
    return out


def token_loss(model: Any, batch: dict[str, torch.Tensor], reduction: str) -> torch.Tensor:
    """The cross-entropy of ``model(batch["ids"])`` over the valid labels: their ``"sum"`` or
    ``"mean"`` (``reduction``)."""
    logits = model(batch["ids"])
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                           ignore_index=IGNORE, reduction=reduction)
