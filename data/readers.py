"""Readers: JSON array files, JSON Lines files, folders of them, and weighted lists of sources.

A file whose first non-blank character is `[` is read as one JSON array of samples (the seed's
format); any other file as JSON Lines (one sample object per line, blank lines ignored). Folders
are searched recursively for *.json and *.jsonl files, in sorted order, hidden entries skipped.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.errors import DataError

SAMPLE_SUFFIXES = (".json", ".jsonl")

# What `DataSettings.paths` accepts: a path, or a list of paths and {"path": ..., "weight": ...}.
PathEntry = str | os.PathLike[str] | Mapping[str, object]
PathsSpec = PathEntry | Sequence[PathEntry]


@dataclass(frozen=True)
class Source:
    """One entry of the data paths: a file or folder and how often its samples are used per epoch."""

    path: Path
    weight: float = 1.0


@dataclass(frozen=True)
class RawRecord:
    """One parsed JSON value from a sample file, with where it came from."""

    file: str
    index: int  # 0-based index of the sample in its file
    line: int | None  # 1-based line for JSON Lines files, None inside a JSON array
    value: object

    @property
    def where(self) -> str:
        line = f" (line {self.line})" if self.line is not None else ""
        return f"{self.file}: sample {self.index}{line}"


def parse_sources(paths: PathsSpec) -> list[Source]:
    """Normalise the `paths` setting into a list of sources, checking every entry."""
    items = [paths] if isinstance(paths, (str, os.PathLike, Mapping)) else list(paths)
    if not items:
        raise DataError("the data paths are empty: give a file, a folder or a list of them")
    return [_parse_source(item, i) for i, item in enumerate(items)]


def _parse_source(item: object, i: int) -> Source:
    if isinstance(item, (str, os.PathLike)):
        return Source(Path(item))
    if not isinstance(item, Mapping):
        raise DataError(
            f'data path entry {i}: expected a path or {{"path": ..., "weight": ...}}, '
            f"got {type(item).__name__}"
        )
    if "path" not in item or set(item) - {"path", "weight"}:
        raise DataError(
            f'data path entry {i}: expected keys "path" and optional "weight", got {sorted(item)}'
        )
    path, weight = item["path"], item.get("weight", 1.0)
    if not isinstance(path, (str, os.PathLike)):
        raise DataError(f'data path entry {i}: "path" must be a string, got {path!r}')
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (0 < weight < math.inf):
        raise DataError(
            f'data path entry {i} ({path}): "weight" must be a number > 0, got {weight!r} '
            "(2.0 uses each sample twice per epoch, 0.5 a seeded half; "
            "leave the entry out to skip the source)"
        )
    return Source(Path(path), float(weight))


def source_files(source: Source) -> list[Path]:
    """The sample files of a source: the file itself, or the sample files found under a folder."""
    path = source.path
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix in SAMPLE_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DataError(f"{path}: the folder holds no .json or .jsonl sample files")
        return files
    raise DataError(f"{path}: no such file or folder (relative paths start at {Path.cwd()})")


def read_records(path: Path, *, on_invalid: Callable[[DataError], None] | None = None) -> Iterator[RawRecord]:
    """Parse one sample file into raw JSON values, lazily (JSON Lines are streamed line by line).

    A broken JSON array fails the whole file. In a JSON Lines file each line is one sample: a broken
    line raises, or, given `on_invalid` (lenient mode), is passed to it and skipped.
    """
    first = _first_byte(path)
    if first is None:
        raise DataError(f"{path}: the file is empty; it must hold a JSON array or JSON Lines of samples")
    if first == b"[":
        yield from _read_array(path)
    else:
        yield from _read_lines(path, on_invalid)


def _first_byte(path: Path) -> bytes | None:
    """The first byte that is not whitespace (after a UTF-8 byte order mark), None for a blank file."""
    with path.open("rb") as f:
        head = f.read(3)
        chunk = head[3:] if head.startswith(_BOM) else head
        while True:
            stripped = chunk.lstrip(b" \t\r\n")
            if stripped:
                return stripped[:1]
            chunk = f.read(1 << 16)
            if not chunk:
                return None


_BOM = b"\xef\xbb\xbf"


def _read_array(path: Path) -> Iterator[RawRecord]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, data.count(b"\n", 0, err.start) + 1) from err
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        raise _broken_json(path, err, err.lineno) from err
    if not isinstance(values, list):
        raise DataError(f"{path}: expected a JSON array of samples, got {type(values).__name__}")
    for i, value in enumerate(values):
        yield RawRecord(str(path), i, None, value)


def _read_lines(path: Path, on_invalid: Callable[[DataError], None] | None) -> Iterator[RawRecord]:
    index = 0  # counts broken lines too, so a sample's index does not depend on lenient mode
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                raise _not_utf8(path, line_no) from err
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                error = _broken_json(path, err, line_no)
                if on_invalid is None:
                    raise error from err
                on_invalid(error)
            else:
                yield RawRecord(str(path), index, line_no, value)
            index += 1


def _not_utf8(path: Path, line: int) -> DataError:
    return DataError(f"{path}: not UTF-8 text at line {line}; save the file as UTF-8")


def _broken_json(path: Path, err: json.JSONDecodeError, line: int) -> DataError:
    hint = _json_hint(err)
    if not hint and err.doc is not None and not err.doc.lstrip().startswith("[") and path.suffix == ".json":
        hint = " (the file does not start with '[', so it is read as JSON Lines: one sample object per line)"
    return DataError(
        f"broken JSON in {path} at line {line}, column {err.colno}: {err.msg}{hint}", reason="broken JSON"
    )


def _json_hint(err: json.JSONDecodeError) -> str:
    """Name the two mistakes people copy from commented examples: comments and trailing commas."""
    rest = err.doc[err.pos : err.pos + 2]
    if rest in ("//", "/*"):
        return " (JSON has no comments: remove them)"
    if err.doc[: err.pos].rstrip().endswith(",") and rest[:1] in ("]", "}"):
        return " (JSON allows no comma before ] or }: remove the trailing comma)"
    return ""


def weighted_indices(n: int, weight: float, rng: np.random.Generator) -> np.ndarray:
    """Indices 0..n-1 repeated floor(weight) times, plus a seeded subset for the fractional part.

    weight 2.0 -> every sample twice; 0.5 -> a random half (rounded), chosen by `rng`.
    """
    whole = int(weight)
    extra = round((weight - whole) * n)
    picked = np.sort(rng.choice(n, size=extra, replace=False)) if extra else np.empty(0, dtype=np.int64)
    return np.concatenate([np.tile(np.arange(n), whole), picked]).astype(np.int64)
