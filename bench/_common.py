"""Helpers shared by bench/pipe_vs_zero3.py and bench/pipe_scaling.py: the benchmark model, the
random token rows both arms train on, launching the DeepSpeed workers, statistics, and a tiny
SVG line-plot writer (no plotting dependency)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "bench" / "workers" / "arms.py"

# llama-family shapes sized for a 2-core CPU. "bench" is llama-7B scaled down with its proportions
# kept: intermediate = 2.6875 x hidden, vocab / hidden ~ 8 (so the LM head costs ~0.66 of a block,
# as in the 7B), kv heads = heads, untied embeddings; 12 blocks (the 7B has 32) so a 2-stage split
# can balance to within ~5%. A step of 8 rows x 256 tokens takes ~0.8 s on two cores.
MODELS: dict[str, dict[str, Any]] = {
    "bench": dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=12,
                  num_attention_heads=4, num_key_value_heads=4),
    # the same with llama-2's 32,000-token vocabulary: the head dominates (optimisation A/B only)
    "bench-v32k": dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=12,
                       num_attention_heads=4, num_key_value_heads=4),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4),
}


def llama_config(name: str) -> Any:
    """A transformers LlamaConfig for a preset in MODELS (random init, nothing downloaded)."""
    from transformers import LlamaConfig

    config = LlamaConfig(**MODELS[name], max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=10000.0,
                         initializer_range=0.02, tie_word_embeddings=False, pad_token_id=None, bos_token_id=1,
                         eos_token_id=2, use_cache=False)
    config._attn_implementation = "sdpa"
    return config


def param_count(name: str) -> int:
    m = MODELS[name]
    h, i, v, n = m["hidden_size"], m["intermediate_size"], m["vocab_size"], m["num_hidden_layers"]
    hd = h // m["num_attention_heads"]
    attn = h * hd * (2 * m["num_attention_heads"] + 2 * m["num_key_value_heads"])
    return n * (attn + 3 * h * i + 2 * h) + 2 * v * h + h


def train_flops_per_token(name: str, seq_len: int) -> float:
    """Model FLOPs per trained token, in the usual MFU convention (PaLM, appendix B): 6 per
    weight that multiplies (every parameter but the input embedding's lookup table) plus
    12 x layers x hidden x seq_len for attention scores and mixing, no causal discount."""
    m = MODELS[name]
    return 6.0 * (param_count(name) - m["vocab_size"] * m["hidden_size"]) + 12.0 * m["num_hidden_layers"] * \
        m["hidden_size"] * seq_len


def matmul_peak_flops(threads: int = 1, n: int = 1024, repeats: int = 20) -> float:
    """Measured fp32 GEMM rate of this machine (FLOP/s, best of `repeats`): the attainable peak
    that CPU MFU figures are relative to (the vendor peak is not known inside a VM)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    torch.set_num_threads(before)
    return 2.0 * n**3 / best


def random_rows(n_rows: int, seq_len: int, vocab: int, seed: int) -> Any:
    """`data.Rows` of uniform random tokens, one pretrain sample per row with every position
    trained but the last (targets already shifted, as data/ builds them)."""
    from data import IGNORE_INDEX, Rows

    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(n_rows, seq_len), dtype=np.int32)
    targets = np.full_like(ids, IGNORE_INDEX)
    targets[:, :-1] = ids[:, 1:]
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), ids.shape).copy()
    return Rows(input_ids=ids, targets=targets, position_ids=positions, segment_ids=np.ones_like(ids),
                n_trained=np.full(n_rows, seq_len - 1, dtype=np.int64), stats={}, files=("random",),
                row_offsets=np.arange(n_rows + 1, dtype=np.int64),
                sample_file=np.zeros(n_rows, dtype=np.int64),
                sample_index=np.arange(n_rows, dtype=np.int64))


# ---------------------------------------------------------------------------------------------
# launching


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Launch:
    """One `deepspeed --num_gpus N bench/workers/arms.py ...` run and what its rank 0 wrote."""

    result: dict[str, Any]
    seconds: float


def launch(job: dict[str, Any], *, procs: int, threads: int, timeout: float = 1800.0,
           retries: int = 1) -> Launch:
    """Run the worker on `procs` ranks with `threads` torch threads each; return its JSON result.
    The job dict is passed through a file; the worker writes its result to another. A failed
    launch is retried (`retries` times): a rank occasionally dies in gloo on a busy machine."""
    for attempt in range(retries + 1):
        try:
            return _launch_once(job, procs=procs, threads=threads, timeout=timeout)
        except RuntimeError as err:
            if attempt == retries:
                raise
            print(f"  (launch failed, retrying: {str(err).splitlines()[0]})", file=sys.stderr, flush=True)
    raise AssertionError("unreachable")


def _launch_once(job: dict[str, Any], *, procs: int, threads: int, timeout: float) -> Launch:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps({**job, "threads": threads}))
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(procs), "--master_port",
               str(port), str(WORKER), "--job", str(job_path), "--out", str(out_path)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO),
               "PYTHONWARNINGS": "ignore"}
        started = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        finally:
            remove_shm_segments(port, procs)
        seconds = time.perf_counter() - started
        if proc.returncode != 0 or not out_path.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
            raise RuntimeError(f"worker failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
        return Launch(json.loads(out_path.read_text()), seconds)


def remove_shm_segments(port: int, procs: int) -> None:
    """DeepSpeed's CPU all-reduce maps a 66 MB /dev/shm segment per rank, named after the master
    address and port, and never unlinks it: every launch would leave procs x 66 MB of RAM behind."""
    for rank in range(procs):
        name = f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{rank}"
        Path("/dev/shm", name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# statistics and formatting


def stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "median": float(np.median(a)), "max": float(a.max()), "n": int(len(a))}


def pct(std: float, mean: float) -> str:
    return f"±{100 * std / mean:.1f}%" if mean else "n/a"


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def svg_lines(series: dict[str, list[tuple[float, float]]], *, title: str, xlabel: str, ylabel: str,
              log2_x: bool = False, width: int = 560, height: int = 340) -> str:
    """A minimal line chart: one polyline + dots per series, axes with ticks, a legend."""
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    left, right, top, bottom = 64, 150, 34, 46
    pw, ph = width - left - right, height - top - bottom
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    fx = (lambda x: math.log2(x)) if log2_x else (lambda x: x)
    x0, x1 = fx(min(xs)), fx(max(xs))
    y1 = max(ys) * 1.1
    y0 = 0.0

    def px(x: float) -> float:
        return left + (fx(x) - x0) / ((x1 - x0) or 1) * pw

    def py(y: float) -> float:
        return top + ph - (y - y0) / ((y1 - y0) or 1) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left + pw / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
           f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="black"/>']
    for x in sorted(set(xs)):
        out.append(f'<text x="{px(x):.1f}" y="{top + ph + 16}" text-anchor="middle">{x:g}</text>')
    step = _nice_step(y1 - y0)
    y = y0
    while y <= y1:
        out.append(f'<line x1="{left - 4}" y1="{py(y):.1f}" x2="{left + pw}" y2="{py(y):.1f}" '
                   f'stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
        y += step
    out.append(f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle">{xlabel}</text>')
    out.append(f'<text x="14" y="{top + ph / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {top + ph / 2})">{ylabel}</text>')
    for k, (name, pts) in enumerate(series.items()):
        c = colors[k % len(colors)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(pts))
        out.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
        out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{c}"/>' for x, y in pts]
        ly = top + 12 + 18 * k
        out.append(f'<line x1="{left + pw + 12}" y1="{ly - 4}" x2="{left + pw + 32}" y2="{ly - 4}" '
                   f'stroke="{c}" stroke-width="2"/>')
        out.append(f'<text x="{left + pw + 36}" y="{ly}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _nice_step(span: float) -> float:
    raw = span / 5 or 1.0
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
