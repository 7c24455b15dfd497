"""From data paths to training rows: read, validate, render, tokenize, mask, shift, pad/pack, cache.

Usage:
    rows = load_rows(DataSettings(paths="data/samples", max_seq_len=512), tokenizer,
                     cache_dir=Path("runs/x/data_cache"), builder=local_rank == 0)
"""

from __future__ import annotations

import gc
import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from data.cache import build_once, cache_key, file_digest, is_complete, tokenizer_digest, wait_until_complete
from data.encode import SegmentEncoder, TokenizerInfo
from data.errors import DataError
from data.masking import IGNORE_INDEX, LabelledBatch, label_batch, shift_labels
from data.packing import Allocator, fill_rows, one_per_row, pack_best_fit
from data.readers import (
    PathsSpec,
    RawRecord,
    Source,
    parse_sources,
    read_records,
    source_files,
    weighted_indices,
)
from data.sample_types import SAMPLE_TYPES, parse_sample
from data.template import PromptTemplate, Segment, TemplateSpec, load_template, sample_segments

log = logging.getLogger(__name__)

ENCODE_BATCH = 4096  # samples per call into the Rust tokenizer (which spreads a batch over all cores)
WHOLE_TEXT_CHECKS = 16  # per sample type: segment-wise ids compared with the whole text's ids
ROW_ARRAYS = ("input_ids", "targets", "position_ids", "segment_ids", "n_trained")


@dataclass(frozen=True)
class DataSettings:
    """What decides the rows (all of it is part of the cache key)."""

    paths: PathsSpec
    """A sample file, a folder of them, or a list of files, folders and {"path", "weight"} entries."""
    max_seq_len: int
    """Tokens per row; longer samples are truncated."""
    template: TemplateSpec = None
    """Prompt template: None (default), a builtin name, a dict of fields, or a JSON file."""
    train_on_prompt: bool = False
    """Also train the prompt tokens (everything but padding)."""
    pack: bool = False
    """Several samples per row (attention kept within each); False: one sample per row, padded."""
    lenient: bool = False
    """Skip invalid samples and count them instead of failing on the first one."""
    seed: int = 42
    """For fractional source weights and the packing order."""

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_seq_len, bool)
            or not isinstance(self.max_seq_len, int)
            or self.max_seq_len < 2
        ):
            raise DataError(f"max_seq_len must be an integer >= 2, got {self.max_seq_len!r}")
        for name in ("train_on_prompt", "pack", "lenient"):
            if not isinstance(getattr(self, name), bool):
                raise DataError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise DataError(f"seed must be an integer, got {self.seed!r}")
        parse_sources(self.paths)


@dataclass
class SampleTable:
    """Every valid sample, tokenized and truncated, in file order (no weights applied).

    Token arrays are all samples concatenated: sample i is ids[offsets[i]:offsets[i + 1]].
    """

    files: list[str] = field(default_factory=list)
    file_id: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))  # (n,) index into files
    index: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))  # (n,) index in its file
    source: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))  # (n,) index into the sources
    kind: np.ndarray = field(default_factory=lambda: np.empty(0, np.int8))  # (n,) index into SAMPLE_TYPES
    ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))  # (total,)
    labels: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))  # (total,) unshifted
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))  # (n + 1,)
    full_length: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # (n,) before truncation
    skipped: Counter[str] = field(default_factory=Counter)  # invalid samples by reason (lenient mode)
    first_errors: dict[str, str] = field(default_factory=dict)  # reason -> first message

    def __len__(self) -> int:
        return len(self.kind)

    def skip(self, error: DataError) -> None:
        """Count an invalid sample (lenient mode), keeping the first message of each reason."""
        self.skipped[error.reason] += 1
        self.first_errors.setdefault(error.reason, str(error))

    def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of sample i, truncated, labels unshifted."""
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.ids[start:end], self.labels[start:end]


def tokenize_samples(
    sources: Sequence[Source],
    template: PromptTemplate,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_seq_len: int,
    train_on_prompt: bool = False,
    lenient: bool = False,
) -> SampleTable:
    """Read, validate, render and tokenize every sample of `sources`, in batches."""
    job = _Tokenizing(
        SegmentEncoder(tokenizer),
        template,
        max_seq_len=max_seq_len,
        train_on_prompt=train_on_prompt,
        lenient=lenient,
    )
    with _gc_paused():
        for source_no, source in enumerate(sources):
            for path in source_files(source):
                job.add_file(path, source_no)
    return job.finish()


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Tokenizing creates millions of short-lived lists of ints, which hold no reference cycles;
    the cyclic garbage collector would scan them again and again (~20% of the time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Tokenizing:
    """Builds a SampleTable batch by batch; the pieces are joined once in `finish`."""

    def __init__(
        self,
        encoder: SegmentEncoder,
        template: PromptTemplate,
        *,
        max_seq_len: int,
        train_on_prompt: bool,
        lenient: bool,
    ) -> None:
        self.encoder, self.template = encoder, template
        self.max_seq_len, self.train_on_prompt, self.lenient = max_seq_len, train_on_prompt, lenient
        self.table = SampleTable()
        self.checked: Counter[str] = Counter()  # whole-text checks done per sample type
        self.identity: list[tuple[int, int, int, int]] = []  # (file, index, source, type) per sample
        self.batches: list[LabelledBatch] = []

    def add_file(self, path: Path, source_no: int) -> None:
        self.table.files.append(str(path))
        records = read_records(path, on_invalid=self.table.skip if self.lenient else None)
        while chunk := list(islice(records, ENCODE_BATCH)):
            parsed = [p for p in (self._render(r) for r in chunk) if p is not None]
            encoded = self.encoder.encode([segments for _, _, segments in parsed])
            for (record, kind, segments), segment_ids in zip(parsed, encoded):
                if self.checked[kind] < WHOLE_TEXT_CHECKS:
                    self.encoder.check_whole_text(segments, segment_ids, record.where)
                    self.checked[kind] += 1
            trained = [[s.trained for s in segments] for _, _, segments in parsed]
            self.batches.append(label_batch(encoded, trained, self.max_seq_len))
            file_no = len(self.table.files) - 1
            self.identity += [(file_no, r.index, source_no, SAMPLE_TYPES.index(k)) for r, k, _ in parsed]

    def _render(self, record: RawRecord) -> tuple[RawRecord, str, list[Segment]] | None:
        """Validate and render one record; None when it is invalid and skipped (lenient mode)."""
        try:
            kind, sample = parse_sample(record.value, record.where)
        except DataError as err:
            if not self.lenient:
                raise
            self.table.skip(err)
            return None
        info = self.encoder.info
        segments = sample_segments(
            sample, self.template, bos=info.bos, eos=info.eos, train_on_prompt=self.train_on_prompt
        )
        return record, kind, segments

    def finish(self) -> SampleTable:
        table = self.table
        if not self.identity:
            return table
        identity = np.array(self.identity, dtype=np.int64)
        table.file_id, table.index, table.source = (identity[:, k].astype(np.int32) for k in range(3))
        table.kind = identity[:, 3].astype(np.int8)
        table.full_length = np.concatenate([b.full_lengths for b in self.batches])
        kept = np.concatenate([np.diff(b.offsets) for b in self.batches])
        table.offsets = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
        table.ids = np.concatenate([b.ids for b in self.batches])
        table.labels = np.concatenate([b.labels for b in self.batches])
        self.batches.clear()
        return table


@dataclass(frozen=True)
class Rows:
    """Training rows, [n_rows, T] int32 each (memory-mapped when read from the cache)."""

    input_ids: np.ndarray
    targets: np.ndarray  # shifted: targets[t] = labels[t + 1]; IGNORE_INDEX where nothing is trained
    position_ids: np.ndarray
    segment_ids: np.ndarray
    n_trained: np.ndarray  # [n_rows] number of targets != IGNORE_INDEX
    stats: dict[str, Any]
    files: tuple[str, ...]
    row_offsets: np.ndarray  # [n_rows + 1] the samples of row i are entries row_offsets[i]:row_offsets[i + 1]
    sample_file: np.ndarray  # [n_entries] index into files
    sample_index: np.ndarray  # [n_entries] index of the sample in its file

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def max_seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def row_samples(self, i: int) -> list[tuple[str, int]]:
        """The samples in row i as (file, index in file), in the order they sit in the row."""
        start, end = int(self.row_offsets[i]), int(self.row_offsets[i + 1])
        return [
            (self.files[f], int(k)) for f, k in zip(self.sample_file[start:end], self.sample_index[start:end])
        ]

    @classmethod
    def load(cls, directory: Path) -> Rows:
        """Read a complete cache directory; the row arrays are memory-mapped."""
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in ROW_ARRAYS}
        small = {
            name: np.load(directory / f"{name}.npy")
            for name in ("row_offsets", "sample_file", "sample_index")
        }
        return cls(**arrays, **small, stats=meta["stats"], files=tuple(meta["files"]))


def load_rows(
    settings: DataSettings,
    tokenizer: PreTrainedTokenizerBase,
    *,
    cache_dir: Path | str | None = None,
    builder: bool = True,
    timeout_s: float = 3600.0,
) -> Rows:
    """Build the rows, or read them from `cache_dir/rows-<key>` when cached.

    builder=True: build the cache if it is missing. builder=False: wait (up to timeout_s) for the
    builder process to finish it, then read it. cache_dir=None: build in memory, no cache.
    """
    template = load_template(settings.template)
    sources = parse_sources(settings.paths)
    if cache_dir is None:
        return _build_rows(settings, template, tokenizer, sources, _in_memory)
    final = Path(cache_dir) / f"rows-{_rows_key(settings, template, tokenizer, sources)}"
    if is_complete(final):
        log.info("data: reading cached rows from %s", final)
    elif builder:
        build_once(
            final,
            lambda tmp: _save_meta(_build_rows(settings, template, tokenizer, sources, _memmap_in(tmp)), tmp),
        )
    else:
        log.info("data: waiting for the builder process to write %s", final)
        wait_until_complete(final, timeout_s=timeout_s)
    return Rows.load(final)


def _rows_key(
    settings: DataSettings,
    template: PromptTemplate,
    tokenizer: PreTrainedTokenizerBase,
    sources: Sequence[Source],
) -> str:
    data = [
        {
            "path": str(s.path),
            "weight": s.weight,
            "files": [[str(p), file_digest(p)] for p in source_files(s)],
        }
        for s in sources
    ]
    return cache_key(
        {
            "data": data,
            "tokenizer": tokenizer_digest(tokenizer),
            "template": template.to_dict(),
            "settings": {
                k: getattr(settings, k) for k in ("max_seq_len", "train_on_prompt", "pack", "lenient", "seed")
            },
        }
    )


def _in_memory(name: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.empty(shape, dtype=np.int32)


def _memmap_in(directory: Path) -> Allocator:
    def allocate(name: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.lib.format.open_memmap(directory / f"{name}.npy", mode="w+", dtype=np.int32, shape=shape)

    return allocate


def _save_meta(rows: Rows, directory: Path) -> None:
    """Complete a cache directory whose row arrays were written in place by `_memmap_in`."""
    for name in ("row_offsets", "sample_file", "sample_index"):
        np.save(directory / f"{name}.npy", getattr(rows, name))
    meta = {"files": list(rows.files), "stats": rows.stats}
    (directory / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")


def _build_rows(
    settings: DataSettings,
    template: PromptTemplate,
    tokenizer: PreTrainedTokenizerBase,
    sources: Sequence[Source],
    allocate: Allocator,
) -> Rows:
    T = settings.max_seq_len
    table = tokenize_samples(
        sources,
        template,
        tokenizer,
        max_seq_len=T,
        train_on_prompt=settings.train_on_prompt,
        lenient=settings.lenient,
    )
    targets = shift_labels(table.labels, table.offsets)  # the one shift, per sample, before placing
    trained = _per_sample_count(targets != IGNORE_INDEX, table.offsets)
    entries = _weighted_entries(table, sources, settings.seed)
    entries = entries[trained[entries] > 0]  # nothing left to learn after truncation: dropped
    if len(entries) == 0:
        raise DataError(_nothing_left(table, trained))
    lengths = np.diff(table.offsets)[entries]
    groups = pack_best_fit(lengths, T, settings.seed) if settings.pack else one_per_row(len(entries))
    groups = [[int(entries[g]) for g in group] for group in groups]
    pad_id = TokenizerInfo(tokenizer).pad_id
    arrays = fill_rows(
        groups,
        ids=table.ids,
        targets=targets,
        offsets=table.offsets,
        max_len=T,
        pad_id=pad_id,
        allocate=allocate,
    )
    placed = np.fromiter((e for group in groups for e in group), dtype=np.int64)
    stats = _stats(table, trained, arrays, settings, n_placed=len(placed))
    _log_summary(table, stats)
    return Rows(
        **arrays,
        stats=stats,
        files=tuple(table.files),
        row_offsets=np.concatenate([[0], np.cumsum([len(g) for g in groups])]).astype(np.int64),
        sample_file=table.file_id[placed],
        sample_index=table.index[placed],
    )


def _per_sample_count(mask: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Count of True per sample of a concatenated mask. -> (n,) int64"""
    cumulative = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    return cumulative[offsets[1:]] - cumulative[offsets[:-1]]


def _weighted_entries(table: SampleTable, sources: Sequence[Source], seed: int) -> np.ndarray:
    """Sample numbers to place, each source's samples repeated/subsampled by its weight."""
    parts = []
    for source_no, source in enumerate(sources):
        members = np.flatnonzero(table.source == source_no)
        rng = np.random.default_rng([seed, source_no])
        parts.append(members[weighted_indices(len(members), source.weight, rng)])
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def _nothing_left(table: SampleTable, trained: np.ndarray) -> str:
    skipped = sum(table.skipped.values())
    return (
        f"no sample left to train on: {len(table)} valid samples, "
        f"{int((trained == 0).sum())} of them dropped "
        f"because truncation left no trained token, {skipped} invalid samples skipped; "
        "check the data paths, raise max_seq_len or fix the samples"
    )


def length_histogram(lengths: np.ndarray, max_len: int, bins: int = 8) -> dict[str, int]:
    """Counts of sample lengths (tokens before truncation) in `bins` equal ranges up to max_len,
    plus one range for longer samples (the truncated ones): {"1-64": n, ..., ">512": n}."""
    upper = np.unique(np.ceil(np.linspace(0, max_len, bins + 1)).astype(np.int64))[
        1:
    ]  # range i: (upper[i-1], upper[i]]
    counts = np.bincount(np.searchsorted(upper, lengths, side="left"), minlength=len(upper) + 1)
    labels = [f"{lo + 1}-{hi}" for lo, hi in zip([0, *upper[:-1]], upper)] + [f">{max_len}"]
    return {label: int(count) for label, count in zip(labels, counts)}


def _stats(
    table: SampleTable,
    trained: np.ndarray,
    arrays: dict[str, np.ndarray],
    settings: DataSettings,
    *,
    n_placed: int,
) -> dict[str, Any]:
    n_rows, T = arrays["input_ids"].shape
    tokens_all = n_rows * T
    tokens_real = int(np.count_nonzero(arrays["segment_ids"]))
    tokens_trained = int(arrays["n_trained"].sum())
    return {
        "files": len(table.files),
        "samples": len(table),
        "by_type": {t: int((table.kind == i).sum()) for i, t in enumerate(SAMPLE_TYPES)},
        "skipped_invalid": dict(sorted(table.skipped.items())),
        "truncated": int((table.full_length > T).sum()),
        "dropped_no_trained": int((trained == 0).sum()),
        "rows": int(n_rows),
        "samples_in_rows": n_placed,
        "max_seq_len": T,
        "packed": settings.pack,
        "tokens_all": tokens_all,
        "tokens_real": tokens_real,
        "tokens_trained": tokens_trained,
        "efficiency_real": tokens_real / tokens_all if tokens_all else 0.0,
        "efficiency_trained": tokens_trained / tokens_all if tokens_all else 0.0,
        "length_histogram": length_histogram(table.full_length, T),
    }


def _log_summary(table: SampleTable, stats: dict[str, Any]) -> None:
    log.info(
        "data: %d samples (%s) -> %d rows of %d tokens; truncated %d, dropped %d (nothing trained left); "
        "efficiency real %.1f%%, trained %.1f%%",
        stats["samples"],
        ", ".join(f"{k} {v}" for k, v in stats["by_type"].items() if v),
        stats["rows"],
        stats["max_seq_len"],
        stats["truncated"],
        stats["dropped_no_trained"],
        100 * stats["efficiency_real"],
        100 * stats["efficiency_trained"],
    )
    for line in skipped_summary(table):
        log.warning("%s", line)


def skipped_summary(table: SampleTable) -> Iterator[str]:
    """Lines that report the samples skipped in lenient mode, with the first message per reason."""
    total = sum(table.skipped.values())
    if total:
        counts = ", ".join(f"{reason} {n}" for reason, n in sorted(table.skipped.items()))
        yield f"data: skipped {total} invalid samples (lenient): {counts}"
        for reason, message in sorted(table.first_errors.items()):
            yield f"data:   first {reason}: {message}"
