"""Which rows each step trains on, and the micro-batches each data-parallel rank feeds DeepSpeed.

Step s's global batch is a pure function of (seed, s): epoch e = s // steps_per_epoch takes a
seeded permutation of all rows, and step s its k-th slice. Resuming at step s therefore sees
exactly the rows an uninterrupted run would have seen, with no sampler state to save.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from data import IGNORE_INDEX, Rows
from training.config import BatchShape, ConfigError

MicroBatch = tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Schedule:
    n_rows: int
    shape: BatchShape
    seed: int
    n_epochs: int
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the training data has {self.n_rows} rows but one step needs train_batch_size = "
                f"{self.shape.global_rows} rows; add data, or lower train_micro_batch_size_per_gpu / "
                f"gradient_accumulation_steps")

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches per epoch; the remainder rows of a permutation wait for the next."""
        return self.n_rows // self.shape.global_rows

    @property
    def total_steps(self) -> int:
        steps = self.n_epochs * self.steps_per_epoch
        return min(steps, self.max_steps) if self.max_steps else steps

    def step_rows(self, step: int) -> np.ndarray:
        """Row indices [global_rows] of step `step` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
        g = self.shape.global_rows
        return order[k * g:(k + 1) * g]


def scale_for(rows: Rows, step_rows: np.ndarray, shape: BatchShape) -> float:
    """Loss scale making the step's gradient that of the mean loss over all trained tokens of
    the global batch: DeepSpeed divides by the accumulation steps and averages over data-parallel
    ranks, so each micro-batch's summed token loss is multiplied by accum * data / tokens."""
    tokens = int(rows.n_trained[step_rows].sum())
    return shape.accum * shape.data / max(tokens, 1)


def micro_batches(rows: Rows, step_rows: np.ndarray, shape: BatchShape, dp_rank: int,
                  scale: float | None = None) -> Iterator[MicroBatch]:
    """The `accum` micro-batches of data-parallel rank `dp_rank` for one step:
    ((input_ids, position_ids, segment_ids, targets), (scale, row ids)), int64 tensors [micro, T]."""
    scale = scale_for(rows, step_rows, shape) if scale is None else scale
    per_rank = shape.micro * shape.accum
    mine = step_rows[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    scale_t = torch.tensor([scale], dtype=torch.float32)
    for m in range(shape.accum):
        idx = mine[m * shape.micro:(m + 1) * shape.micro]
        inputs = tuple(torch.from_numpy(np.asarray(a[idx], dtype=np.int64))
                       for a in (rows.input_ids, rows.position_ids, rows.segment_ids, rows.targets))
        yield inputs, (scale_t, torch.from_numpy(idx.astype(np.int64)))


def step_token_counts(rows: Rows, step_rows: np.ndarray) -> tuple[int, int, int]:
    """(real tokens, trained tokens, samples) in a global batch, for throughput figures."""
    real = int((np.asarray(rows.segment_ids[step_rows]) > 0).sum())
    trained = int(rows.n_trained[step_rows].sum())
    samples = int(sum(rows.row_offsets[i + 1] - rows.row_offsets[i] for i in step_rows))
    return real, trained, samples


def eval_batches(rows: Rows, shape: BatchShape, dp_rank: int, pad_id: int) -> Iterator[Iterator[MicroBatch]]:
    """All eval rows in order, as global batches; the last is filled with rows that train nothing.
    Every micro-batch is scaled by the eval set's total trained tokens, so the sum over batches of
    DeepSpeed's averaged eval loss is the mean over all eval tokens."""
    g = shape.global_rows
    n = len(rows)
    scale = shape.accum * shape.data / max(int(rows.n_trained.sum()), 1)
    padded = _with_filler_rows(rows, -n % g, pad_id)
    for start in range(0, len(padded), g):
        yield micro_batches(padded, np.arange(start, start + g), shape, dp_rank, scale=scale)


def _with_filler_rows(rows: Rows, count: int, pad_id: int) -> Rows:
    if count == 0:
        return rows
    t = rows.max_seq_len

    def extend(a: np.ndarray, fill: int) -> np.ndarray:
        return np.concatenate([np.asarray(a), np.full((count, t), fill, dtype=a.dtype)])

    return Rows(input_ids=extend(rows.input_ids, pad_id), targets=extend(rows.targets, IGNORE_INDEX),
                position_ids=extend(rows.position_ids, 0), segment_ids=extend(rows.segment_ids, 0),
                n_trained=np.concatenate([np.asarray(rows.n_trained), np.zeros(count, dtype=rows.n_trained.dtype)]),
                stats=rows.stats, files=rows.files,
                row_offsets=np.concatenate([rows.row_offsets, np.full(count, rows.row_offsets[-1])]),
                sample_file=rows.sample_file, sample_index=rows.sample_index)
