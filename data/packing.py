"""Place tokenized samples into fixed-length rows: one per row (padded) or several (packed).

A row is four int32 vectors of length T (see docs/architecture.md):
  input_ids     token ids, pad id after the last sample
  targets       shifted labels, IGNORE_INDEX on padding
  position_ids  0, 1, 2, ... restarting for every sample; padding continues the last sample's count
                (an unpadded row's positions are therefore 0..T-1)
  segment_ids   1, 2, 3, ... per sample in the row, 0 on padding
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable

import numpy as np

from data.masking import IGNORE_INDEX

# allocate(name, shape) -> an int32 array to fill: in memory, or a memory-mapped file in the cache
Allocator = Callable[[str, tuple[int, ...]], np.ndarray]
ROW_CHUNK = 4096  # rows filled per vectorised step


def one_per_row(n: int) -> list[list[int]]:
    return [[i] for i in range(n)]


def pack_best_fit(lengths: np.ndarray, capacity: int, seed: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: groups of entry indices whose lengths sum to <= capacity.

    Entries go longest first (ties in a seeded random order) into the fullest row that still has
    room. Rows come back in a seeded random order, so they are not sorted by length.
    """
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(lengths))
    order = shuffled[np.argsort(-lengths[shuffled], kind="stable")]
    rows: list[list[int]] = []
    rows_with_room: dict[int, list[int]] = {}  # free space -> rows with exactly that much room
    free_sizes: list[int] = []  # sorted keys of rows_with_room; at most `capacity` of them
    for entry in order.tolist():
        need = int(lengths[entry])
        k = bisect_left(free_sizes, need)
        if k == len(free_sizes):
            row, free = len(rows), capacity - need
            rows.append([entry])
        else:
            old_free = free_sizes[k]
            row, free = rows_with_room[old_free].pop(), old_free - need
            rows[row].append(entry)
            if not rows_with_room[old_free]:
                del rows_with_room[old_free]
                free_sizes.pop(k)
        if free > 0:
            if free not in rows_with_room:
                rows_with_room[free] = []
                insort(free_sizes, free)
            rows_with_room[free].append(row)
    return [rows[i] for i in rng.permutation(len(rows))]


def fill_rows(
    groups: list[list[int]],
    *,
    ids: np.ndarray,
    targets: np.ndarray,
    offsets: np.ndarray,
    max_len: int,
    pad_id: int,
    allocate: Allocator,
) -> dict[str, np.ndarray]:
    """Write the rows: row r holds the entries groups[r], in order. `ids`/`targets`: all entries'
    tokens concatenated, entry e at offsets[e]:offsets[e + 1]. Returns input_ids, targets,
    position_ids, segment_ids [n_rows, T] and n_trained [n_rows]. Works in chunks of rows, so
    temporaries stay small however large the data set is."""
    n_rows = len(groups)
    out = {
        name: allocate(name, (n_rows, max_len))
        for name in ("input_ids", "targets", "position_ids", "segment_ids")
    }
    out["n_trained"] = allocate("n_trained", (n_rows,))
    for start in range(0, n_rows, ROW_CHUNK):
        chunk = {name: array[start : start + ROW_CHUNK] for name, array in out.items()}
        _fill_chunk(
            groups[start : start + ROW_CHUNK], chunk, ids=ids, targets=targets, offsets=offsets, pad_id=pad_id
        )
    return out


def _fill_chunk(
    groups: list[list[int]],
    out: dict[str, np.ndarray],
    *,
    ids: np.ndarray,
    targets: np.ndarray,
    offsets: np.ndarray,
    pad_id: int,
) -> None:
    """Vectorised over all tokens of the chunk: one gather from the concatenated entries and one
    scatter into the rows, instead of a Python loop per sample."""
    n_rows, T = out["input_ids"].shape
    counts = np.array([len(g) for g in groups], dtype=np.int64)
    entry = np.fromiter((e for g in groups for e in g), dtype=np.int64, count=int(counts.sum()))
    row = np.repeat(np.arange(n_rows), counts)  # row of each placed entry
    first = np.cumsum(counts) - counts  # position (in `entry`) of each row's first entry
    lengths = offsets[entry + 1] - offsets[entry]
    starts = np.cumsum(lengths) - lengths  # start of each entry in the concatenation of the chunk's rows
    col0 = starts - starts[first][row]  # column where each entry starts in its row
    seg_no = np.arange(len(entry)) - first[row] + 1
    assert (col0 + lengths <= T).all(), "a row overflows max_seq_len"

    within = np.arange(int(lengths.sum())) - np.repeat(starts, lengths)  # position inside its sample
    src = np.repeat(offsets[entry], lengths) + within
    dst = np.repeat(row * T + col0, lengths) + within
    out["input_ids"][:] = pad_id
    out["targets"][:] = IGNORE_INDEX
    out["segment_ids"][:] = 0
    # padding continues counting from the row's last sample, so a one-sample row reads 0..T-1
    last_start = col0[first + counts - 1]
    out["position_ids"][:] = np.arange(T, dtype=np.int32)[None, :] - last_start[:, None].astype(np.int32)
    for name, values in (
        ("input_ids", ids[src]),
        ("targets", targets[src]),
        ("position_ids", within),
        ("segment_ids", np.repeat(seg_no, lengths)),
    ):
        out[name].reshape(-1)[dst] = values
    out["n_trained"][:] = np.count_nonzero(out["targets"] != IGNORE_INDEX, axis=1)
