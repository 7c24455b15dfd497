"""Labels from trained segments, truncation, and the one place where labels are shifted.

`labels` follow the Hugging Face convention: labels[t] == input_ids[t] where token t is trained,
IGNORE_INDEX elsewhere. `targets` are what the model predicts at each position:
targets[t] = labels[t + 1]. Shifting happens once per sample, before padding or packing, so a
packed row never trains a sample's first token from the previous sample's last one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

IGNORE_INDEX = -100
"""Label/target value of positions that are not trained (prompt, padding, last position)."""


@dataclass(frozen=True)
class LabelledBatch:
    """Several samples' tokens, concatenated: sample i is ids[offsets[i]:offsets[i + 1]]."""

    ids: np.ndarray  # (n_tokens,) int32, each sample cut to max_len
    labels: np.ndarray  # (n_tokens,) int32, unshifted
    offsets: np.ndarray  # (n_samples + 1,) int64
    full_lengths: np.ndarray  # (n_samples,) int64, tokens before truncation


def label_batch(
    encoded: Sequence[Sequence[Sequence[int]]], trained: Sequence[Sequence[bool]], max_len: int
) -> LabelledBatch:
    """Token ids per segment per sample -> ids and labels: labels copy the ids of trained segments.

    Each sample keeps its first `max_len` tokens. Nothing is rewritten on truncation: the last kept
    token keeps its own label, so a cut prompt never ends in a trained EOS.
    """
    seg_lengths = np.fromiter((len(seg) for sample in encoded for seg in sample), dtype=np.int64)
    flags = np.fromiter(chain.from_iterable(trained), dtype=bool, count=len(seg_lengths))
    ids = np.fromiter(
        chain.from_iterable(chain.from_iterable(encoded)), dtype=np.int32, count=int(seg_lengths.sum())
    )
    labels = np.where(np.repeat(flags, seg_lengths), ids, np.int32(IGNORE_INDEX))
    full = np.fromiter(
        (sum(len(seg) for seg in sample) for sample in encoded), dtype=np.int64, count=len(encoded)
    )
    within = np.arange(len(ids)) - np.repeat(np.cumsum(full) - full, full)  # position inside its sample
    keep = within < max_len
    kept = np.minimum(full, max_len)
    return LabelledBatch(ids[keep], labels[keep], np.concatenate([[0], np.cumsum(kept)]), full)


def shift_labels(labels: np.ndarray, offsets: np.ndarray | None = None) -> np.ndarray:
    """targets[t] = labels[t + 1] within each sample; a sample's last position has no next token.

    labels: (n,) for one sample, or several samples concatenated, sample i at
    offsets[i]:offsets[i + 1] (offsets: (k + 1,), non-empty samples). -> targets (n,)
    """
    targets = np.full_like(labels, IGNORE_INDEX)
    targets[:-1] = labels[1:]
    if offsets is not None:
        targets[offsets[1:] - 1] = IGNORE_INDEX
    return targets


def n_trained_targets(labels: np.ndarray) -> int:
    """Trained targets after the shift: every trained label except the first position's."""
    return int(np.count_nonzero(labels[1:] != IGNORE_INDEX))
