"""Data pipeline throughput: render + tokenize generated mixed samples; memory; packing efficiency.

    python bench/data_throughput.py [--samples 100000] [--max-seq-len 512]

Generates a seeded mix of all five sample types (English and Chinese words from the shipped
tokenizer corpus, lognormal lengths) as JSONL, then times, with the shipped tokenizer:
  read + validate      JSON parsing and sample validation alone
  render + tokenize    the whole per-sample path (validate, template, segment-wise encoding,
                       masks, truncation) = data.rows.tokenize_samples
  rows padded/packed   load_rows end to end (the above + shift + rows), building the disk cache
  cached read          load_rows again, reading the memory-mapped cache
Prints one JSON object with the figures, and padding/packing efficiency for the shipped samples.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transformers import AutoTokenizer

from data import DataSettings, load_rows, load_template
from data.readers import parse_sources, read_records, source_files
from data.rows import tokenize_samples
from data.sample_types import parse_sample


def word_pools() -> tuple[list[str], list[str]]:
    corpus = REPO / "data" / "tokenizer_corpus"
    english = re.findall(r"[A-Za-z']+", (corpus / "en.txt").read_text(encoding="utf-8"))
    chinese = re.findall(r"[\u4e00-\u9fff]", (corpus / "zh.txt").read_text(encoding="utf-8"))
    return english, chinese


def make_text(rng: np.random.Generator, pools: tuple[list[str], list[str]], mean_words: float) -> str:
    n = max(1, int(rng.lognormal(np.log(mean_words), 0.7)))
    if rng.random() < 0.5:
        english = pools[0]
        return " ".join(english[i] for i in rng.integers(0, len(english), n)) + "."
    chinese = pools[1]
    return "".join(chinese[i] for i in rng.integers(0, len(chinese), 2 * n)) + "。"


def make_sample(rng: np.random.Generator, pools: tuple[list[str], list[str]]) -> dict[str, Any]:
    kind = ("pretrain", "instruct", "conversation", "ref_qa", "messages")[int(rng.integers(0, 5))]

    def text(mean_words: float) -> str:
        return make_text(rng, pools, mean_words)

    if kind == "pretrain":
        return {"type": kind, "text": text(120)}
    if kind == "instruct":
        sample = {"type": kind, "instruct": text(15), "output": text(40)}
        return {**sample, "input": text(30)} if rng.random() < 0.5 else sample
    rounds = [["ask", text(12)], ["ans", text(30)]] * int(rng.integers(1, 4))
    if kind == "conversation":
        return {"type": kind, "rounds": rounds}
    if kind == "ref_qa":
        return {"type": kind, "reference": text(80), "rounds": rounds}
    messages = [
        {"role": "user" if role == "ask" else "assistant", "content": content} for role, content in rounds
    ]
    return {"type": kind, "messages": [{"role": "system", "content": text(8)}, *messages]}


def write_samples(path: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pools = word_pools()
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps(make_sample(rng, pools), ensure_ascii=False) + "\n")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def cpu_seconds() -> float:
    """CPU time of this process and all its threads (the Rust tokenizer runs on several)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def efficiency(paths: str, tokenizer: Any, max_seq_len: int, pack: bool) -> dict[str, float]:
    stats = load_rows(DataSettings(paths=paths, max_seq_len=max_seq_len, pack=pack), tokenizer).stats
    return {
        "rows": stats["rows"],
        "real": round(stats["efficiency_real"], 4),
        "trained": round(stats["efficiency_trained"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(REPO / "configs" / "tiny-llama")
    report: dict[str, Any] = {
        "samples": args.samples,
        "max_seq_len": args.max_seq_len,
        "cpus": os.cpu_count(),
        "load_avg_1min_at_start": os.getloadavg()[0],
        "rss_after_imports_mib": round(peak_rss_mib()),
    }
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "mix.jsonl"
        write_samples(data, args.samples, args.seed)
        report["data_mib"] = round(data.stat().st_size / 2**20, 1)
        (path,) = source_files(parse_sources(str(data))[0])
        _, seconds = timed(lambda: [parse_sample(r.value, r.where) for r in read_records(path)])
        report["read_validate_samples_per_s"] = round(args.samples / seconds)
        cpu = cpu_seconds()
        table, seconds = timed(
            lambda: tokenize_samples(
                parse_sources(str(data)), load_template(), tokenizer, max_seq_len=args.max_seq_len
            )
        )
        report["render_tokenize_samples_per_s"] = round(args.samples / seconds)
        report["render_tokenize_samples_per_cpu_s"] = round(args.samples / (cpu_seconds() - cpu))
        report["tokens_per_sample_mean"] = round(float(table.full_length.mean()), 1)
        report["peak_rss_after_tokenize_mib"] = round(peak_rss_mib())
        del table
        for pack in (False, True):
            name = "packed" if pack else "padded"
            settings = DataSettings(paths=str(data), max_seq_len=args.max_seq_len, pack=pack)
            cache = Path(tmp) / "cache"
            rows, seconds = timed(partial(load_rows, settings, tokenizer, cache_dir=cache, builder=True))
            report[f"rows_{name}_build_s"] = round(seconds, 2)
            report[f"rows_{name}_efficiency"] = {
                "rows": len(rows),
                "real": round(rows.stats["efficiency_real"], 4),
                "trained": round(rows.stats["efficiency_trained"], 4),
            }
            _, seconds = timed(partial(load_rows, settings, tokenizer, cache_dir=cache, builder=False))
            report[f"rows_{name}_cached_read_s"] = round(seconds, 2)
            report[f"peak_rss_after_rows_{name}_mib"] = round(peak_rss_mib())
    shipped = str(REPO / "data" / "samples")
    report["shipped_samples_efficiency"] = {
        f"{'packed' if pack else 'padded'}_{t}": efficiency(shipped, tokenizer, t, pack)
        for t in (128, 512)
        for pack in (False, True)
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
