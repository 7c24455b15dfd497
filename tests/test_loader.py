"""The deterministic global-batch loader: order, resume position, loss scale, rank split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data import IGNORE_INDEX, Rows
from training.config import BatchShape, ConfigError
from training.loader import Schedule, eval_batches, micro_batches, scale_for


def synthetic_rows(n: int, t: int = 6) -> Rows:
    """Row i holds token value i everywhere and trains (i % 3) + 1 targets."""
    input_ids = np.repeat(np.arange(n, dtype=np.int32)[:, None], t, axis=1)
    targets = np.full((n, t), IGNORE_INDEX, dtype=np.int32)
    for i in range(n):
        targets[i, : i % 3 + 1] = 7
    return Rows(input_ids=input_ids, targets=targets, position_ids=np.tile(np.arange(t, dtype=np.int32), (n, 1)),
                segment_ids=np.ones((n, t), dtype=np.int32), n_trained=(targets != IGNORE_INDEX).sum(1),
                stats={}, files=("f.json",), row_offsets=np.arange(n + 1), sample_file=np.zeros(n, dtype=np.int64),
                sample_index=np.arange(n))


def test_every_row_once_per_epoch_and_order_depends_on_seed_and_epoch() -> None:
    s = Schedule(n_rows=20, shape=BatchShape(2, 2, 1), seed=3, n_epochs=2)
    assert (s.steps_per_epoch, s.total_steps) == (5, 10)
    epoch0 = np.concatenate([s.step_rows(i) for i in range(5)])
    epoch1 = np.concatenate([s.step_rows(i) for i in range(5, 10)])
    assert sorted(epoch0) == list(range(20)) and sorted(epoch1) == list(range(20))
    assert not np.array_equal(epoch0, epoch1)
    other_seed = Schedule(n_rows=20, shape=BatchShape(2, 2, 1), seed=4, n_epochs=2)
    assert not np.array_equal(epoch0, np.concatenate([other_seed.step_rows(i) for i in range(5)]))


def test_step_rows_is_a_pure_function_of_the_step() -> None:
    """What makes resume exact: a fresh Schedule gives step k the same rows."""
    a = Schedule(n_rows=50, shape=BatchShape(3, 2, 2), seed=1, n_epochs=3)
    b = Schedule(n_rows=50, shape=BatchShape(3, 2, 2), seed=1, n_epochs=3)
    for step in (0, 3, 4, 9, 11):
        assert np.array_equal(a.step_rows(step), b.step_rows(step))


def test_remainder_rows_and_max_steps() -> None:
    s = Schedule(n_rows=21, shape=BatchShape(2, 2, 1), seed=0, n_epochs=3, max_steps=7)
    assert s.steps_per_epoch == 5 and s.total_steps == 7


def test_too_little_data_for_one_step() -> None:
    with pytest.raises(ConfigError, match=r"has 5 rows but one step needs train_batch_size = 8 rows"):
        Schedule(n_rows=5, shape=BatchShape(2, 2, 2), seed=0, n_epochs=1)


def test_micro_batches_split_the_global_batch_over_ranks() -> None:
    rows, shape = synthetic_rows(16), BatchShape(2, 2, 2)
    step_rows = Schedule(n_rows=16, shape=shape, seed=0, n_epochs=1).step_rows(1)
    seen = []
    for dp in range(2):
        batches = list(micro_batches(rows, step_rows, shape, dp))
        assert len(batches) == shape.accum
        for (ids, pos, seg, tgt), (scale, row_ids) in batches:
            assert ids.shape == (2, 6) and ids.dtype == torch.int64
            assert torch.equal(ids[:, 0], row_ids)  # the row's tokens came with its id
            seen += row_ids.tolist()
    assert sorted(seen) == sorted(step_rows.tolist())


def test_scale_gives_mean_over_trained_tokens_of_the_global_batch() -> None:
    """Sum over micro-batches and ranks of (token loss sum * scale), divided by accum and averaged
    over ranks as DeepSpeed does, equals the token mean of the global batch."""
    rows, shape = synthetic_rows(16), BatchShape(2, 2, 2)
    step_rows = Schedule(n_rows=16, shape=shape, seed=0, n_epochs=1).step_rows(0)
    per_token = torch.rand(16, 6)  # a made-up loss per (row, position)
    total = 0.0
    for dp in range(2):
        rank_sum = 0.0
        for (ids, _, _, tgt), (scale, row_ids) in micro_batches(rows, step_rows, shape, dp):
            rank_sum += float((per_token[row_ids] * (tgt != IGNORE_INDEX)).sum() * scale)
        total += rank_sum / shape.accum / shape.data
    trained = torch.from_numpy(rows.targets[step_rows] != IGNORE_INDEX)
    expected = float(per_token[torch.from_numpy(step_rows)][trained].mean())
    assert total == pytest.approx(expected, rel=1e-6)
    assert scale_for(rows, step_rows, shape) == pytest.approx(4 / trained.sum().item())


def test_eval_batches_cover_all_rows_once_with_filler() -> None:
    rows, shape = synthetic_rows(7), BatchShape(2, 1, 2)
    seen, filler_trained = [], 0
    for batch in eval_batches(rows, shape, dp_rank=0, pad_id=0):
        for (ids, _, seg, tgt), (_, row_ids) in batch:
            for r, t, s in zip(row_ids.tolist(), tgt, seg):
                if r < 7:
                    seen.append(r)
                else:
                    filler_trained += int((t != IGNORE_INDEX).sum()) + int(s.sum())
    for batch in eval_batches(rows, shape, dp_rank=1, pad_id=0):
        seen += [r for (_, (_, row_ids)) in batch for r in row_ids.tolist() if r < 7]
    assert sorted(seen) == list(range(7)) and filler_trained == 0
