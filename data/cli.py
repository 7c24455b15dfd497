"""`python -m data`: preview, stats and build-tokenizer.

Commands:
    python -m data preview --data PATH --tokenizer DIR --max-seq-len N [--pretty]
        one JSON object per sample on stdout: {"file", "index", "type", "input_ids", "labels",
        "truncated", "dropped"}; labels are unshifted, -100 = not trained
    python -m data stats --data PATH --tokenizer DIR --max-seq-len N [--pack] [--json]
        counts by type, length histogram, truncation and drop counts, padding/packing efficiency
    python -m data build-tokenizer --out configs/tiny-llama
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from data.build_tokenizer import build_tokenizer
from data.errors import DataError
from data.masking import IGNORE_INDEX, n_trained_targets
from data.readers import parse_sources
from data.rows import DataSettings, SampleTable, load_rows, skipped_summary, tokenize_samples
from data.sample_types import SAMPLE_TYPES
from data.template import PromptTemplate, load_template

TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "preview":
            return _preview(args)
        if args.command == "stats":
            return _stats(args)
        return _build_tokenizer(args)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data", description="Inspect training samples as the model sees them."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    preview = commands.add_parser("preview", help="print every sample's input_ids and labels as JSON lines")
    _add_data_options(preview)
    preview.add_argument(
        "--pretty",
        action="store_true",
        help=f"show text instead, trained parts in {TRAINED_OPEN} {TRAINED_CLOSE}",
    )
    preview.add_argument("--limit", type=int, default=None, help="stop after this many samples")
    stats = commands.add_parser("stats", help="counts, lengths, truncation, drops and efficiency")
    _add_data_options(stats)
    stats.add_argument("--pack", action="store_true", help="pack several samples per row")
    stats.add_argument("--seed", type=int, default=42)
    stats.add_argument("--json", action="store_true", help="print the stats as one JSON object")
    build = commands.add_parser("build-tokenizer", help="build the quickstart tokenizer from shipped text")
    build.add_argument(
        "--out", type=Path, required=True, help="directory to save it in (e.g. configs/tiny-llama)"
    )
    return parser


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", nargs="+", required=True, help="sample files or folders")
    parser.add_argument(
        "--tokenizer", type=Path, required=True, help="a tokenizer directory (save_pretrained)"
    )
    parser.add_argument("--max-seq-len", type=int, required=True)
    parser.add_argument(
        "--template", default=None, help="builtin template name or JSON file (default: default)"
    )
    parser.add_argument("--system", default=None, help="system line for samples without a system message")
    parser.add_argument("--train-on-prompt", action="store_true", help="train prompt tokens too")
    parser.add_argument("--lenient", action="store_true", help="skip invalid samples and count them")


def _template(args: argparse.Namespace) -> PromptTemplate:
    template = load_template(args.template)
    return dataclasses.replace(template, system=args.system) if args.system is not None else template


def _tokenizer(path: Path) -> PreTrainedTokenizerBase:
    if not path.is_dir():
        raise DataError(
            f"--tokenizer {path}: no such directory (give a directory written by save_pretrained)"
        )
    return AutoTokenizer.from_pretrained(path)


def _preview(args: argparse.Namespace) -> int:
    tokenizer = _tokenizer(args.tokenizer)
    table = tokenize_samples(
        parse_sources(args.data),
        _template(args),
        tokenizer,
        max_seq_len=args.max_seq_len,
        train_on_prompt=args.train_on_prompt,
        lenient=args.lenient,
    )
    count = len(table) if args.limit is None else min(args.limit, len(table))
    for i in range(count):
        if args.pretty:
            print(_pretty_sample(table, i, tokenizer, args.max_seq_len))
        else:
            print(json.dumps(_sample_record(table, i, args.max_seq_len), ensure_ascii=False))
    for line in skipped_summary(table):
        print(line, file=sys.stderr)
    return 0


def _sample_record(table: SampleTable, i: int, max_seq_len: int) -> dict[str, Any]:
    ids, labels = table.tokens(i)
    return {
        "file": table.files[table.file_id[i]],
        "index": int(table.index[i]),
        "type": SAMPLE_TYPES[table.kind[i]],
        "input_ids": ids.tolist(),
        "labels": labels.tolist(),
        "truncated": bool(table.full_length[i] > max_seq_len),
        "dropped": n_trained_targets(labels) == 0,
    }


def _pretty_sample(table: SampleTable, i: int, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> str:
    record = _sample_record(table, i, max_seq_len)
    ids, labels = table.tokens(i)
    trained = labels != IGNORE_INDEX
    notes = [f"{len(ids)} tokens", f"{int(trained.sum())} trained"]
    notes += ["truncated"] * record["truncated"] + ["DROPPED: nothing trained"] * record["dropped"]
    parts = [f"=== {record['file']} sample {record['index']} ({record['type']}): {', '.join(notes)} ==="]
    text = ""
    # runs of tokens with the same trained flag, decoded together
    cuts = np.flatnonzero(np.diff(trained.astype(np.int8))) + 1
    for run_ids, run_trained in zip(np.split(ids, cuts), np.split(trained, cuts)):
        piece = tokenizer.decode(
            run_ids.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        text += f"{TRAINED_OPEN}{piece}{TRAINED_CLOSE}" if run_trained[0] else piece
    parts.append(text)
    return "\n".join(parts) + "\n"


def _stats(args: argparse.Namespace) -> int:
    settings = DataSettings(
        paths=args.data,
        max_seq_len=args.max_seq_len,
        template=_template(args),
        train_on_prompt=args.train_on_prompt,
        pack=args.pack,
        lenient=args.lenient,
        seed=args.seed,
    )
    stats = load_rows(settings, _tokenizer(args.tokenizer)).stats
    print(json.dumps(stats, ensure_ascii=False, indent=1) if args.json else format_stats(stats))
    return 0


def format_stats(stats: dict[str, Any]) -> str:
    """The stats dict as a short human-readable report."""
    by_type = ", ".join(f"{k} {v}" for k, v in stats["by_type"].items())
    skipped = stats["skipped_invalid"]
    skipped_text = ", ".join(f"{k} {v}" for k, v in skipped.items()) if skipped else "none"
    histogram = stats["length_histogram"]
    widest = max(histogram.values()) or 1
    lines = [
        f"samples        {stats['samples']} in {stats['files']} files ({by_type})",
        f"invalid        {sum(skipped.values())} skipped ({skipped_text})",
        f"truncated      {stats['truncated']} longer than {stats['max_seq_len']} tokens",
        f"dropped        {stats['dropped_no_trained']} with nothing trained left after truncation",
        (
            f"rows           {stats['rows']} x {stats['max_seq_len']} tokens, "
            f"{stats['samples_in_rows']} samples "
            f"({'packed' if stats['packed'] else 'one per row, padded'})"
        ),
        (
            f"efficiency     real tokens {100 * stats['efficiency_real']:.1f}%, "
            f"trained tokens {100 * stats['efficiency_trained']:.1f}% of all tokens"
        ),
        "length (tokens before truncation):",
    ]
    for label, count in histogram.items():
        lines.append(f"  {label:>12}  {'#' * round(40 * count / widest):<40} {count}")
    return "\n".join(lines)


def _build_tokenizer(args: argparse.Namespace) -> int:
    tokenizer = build_tokenizer(args.out)
    print(
        f"saved {type(tokenizer).__name__} with {len(tokenizer)} tokens to {args.out} "
        f"(bos {tokenizer.bos_token_id}, eos {tokenizer.eos_token_id}, pad {tokenizer.pad_token_id})"
    )
    return 0
