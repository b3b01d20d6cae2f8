"""Synthetic GLUE-MRPC-like data and a tiny BERT, shared by the ported Accelerate examples.

The real examples download bert-base-cased and GLUE MRPC; these scripts run offline. Each
example is a sentence pair ``[CLS] a [SEP] b [SEP]`` of varying length whose label says whether
``b`` paraphrases ``a`` (the same tokens, shuffled, a few replaced) or is unrelated. A tiny
``BertForSequenceClassification`` built from a config learns it in a few hundred steps.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

VOCAB, CLS, SEP, PAD = 256, 1, 2, 0


def make_split(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` tokenized sentence pairs (lists, as a tokenizer returns), half of them paraphrases."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(4, 13, (), generator=g))
        a = torch.randint(3, VOCAB, (length,), generator=g)
        label = i % 2
        if label:
            b = a[torch.randperm(length, generator=g)]
            b[: length // 4] = torch.randint(3, VOCAB, (length // 4,), generator=g)
        else:
            b = torch.randint(3, VOCAB, (int(torch.randint(4, 13, (), generator=g)),), generator=g)
        ids = [CLS, *a.tolist(), SEP, *b.tolist(), SEP]
        types = [0] * (length + 2) + [1] * (len(ids) - length - 2)
        rows.append({"input_ids": ids, "token_type_ids": types, "attention_mask": [1] * len(ids),
                     "labels": label})
    return rows


def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Pad to the longest pair of the batch (``tokenizer.pad(padding="longest")``)."""
    width = max(len(e["input_ids"]) for e in examples)
    out = {key: torch.tensor([e[key] + [PAD] * (width - len(e[key])) for e in examples])
           for key in ("input_ids", "token_type_ids", "attention_mask")}
    out["labels"] = torch.tensor([e["labels"] for e in examples])
    return out


def tiny_bert(dropout: float = 0.1) -> torch.nn.Module:
    """A 2-layer BERT for sequence classification, from a config (no download)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=128, max_position_embeddings=64,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                        num_labels=2)
    return BertForSequenceClassification(config)


def accuracy_f1(predictions: torch.Tensor, references: torch.Tensor) -> dict[str, float]:
    """GLUE MRPC's metrics, computed by hand (the real example uses `evaluate`)."""
    tp = int(((predictions == 1) & (references == 1)).sum())
    fp = int(((predictions == 1) & (references == 0)).sum())
    fn = int(((predictions == 0) & (references == 1)).sum())
    accuracy = float((predictions == references).float().mean())
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {"accuracy": accuracy, "f1": f1, "count": int(references.numel())}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The size and output options every spelling of the example shares."""
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=1024)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--output", default=None, help="write losses and metrics here (JSON)")
