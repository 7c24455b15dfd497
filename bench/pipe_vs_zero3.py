"""Pipeline parallelism vs DeepSpeed ZeRO-3 (and ZeRO-2) on the same model, data and ranks.

    python bench/pipe_vs_zero3.py --quick            # ~1 minute: one sequence length, the ratio line
    python bench/pipe_vs_zero3.py                    # sweep: throughput and peak memory per seq len
    python bench/pipe_vs_zero3.py --seq-lens 256 512 --memory-seq-lens 256 1024 --json out.json \
        --svg docs/x.svg

Arms, all on 2 ranks (`deepspeed --num_gpus 2`, one torch thread each), fp32, torch's AdamW
(DeepSpeed's "torch_adam", as the trainer uses without CUDA), gradient clipping 1.0, the same
global batch of 8 random-token rows, the same transformers-initialised weights:
  pipe      our StagedPipeline (models/pipeline.py) on 2 stages, 1F1B, micro-batch 1 x 8, pipeline_loss
  zero3     transformers LlamaForCausalLM, ZeRO stage 3, data parallel 2, micro-batch 1 x 4 accumulation
  zero2     the same with ZeRO stage 2
  zero3-m4  ZeRO-3 with micro-batch 4 x 1 (its fastest setting here; needs more activation memory)
  pipe-ckpt, zero3-ckpt   pipe / zero3 with activation checkpointing (memory sweep only)
The arms are built in the same two processes and their steps interleaved (one step of each
arm per round, order rotated), so machine load hits all alike; warm-up rounds are not timed. The
first step's losses must agree across arms (same weights, same rows): the run fails otherwise.

Memory: one launch per (arm, seq len), each rank's peak RSS (ru_maxrss) above its RSS just
before the model is built; the longest sequence under a per-rank budget comes from a quadratic
fit of peak vs seq len. The last line is `pipe/zero3 throughput ratio: X` (tokens/s of pipe over
zero3, mean step times over the timed rounds).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import launch, md_table, param_count, pct, stats, svg_lines

GLOBAL_ROWS = 8
ARMS: dict[str, dict[str, Any]] = {
    "pipe": {"kind": "pipe", "pipe": 2, "data": 1, "micro": 1},
    "zero3": {"kind": "zero", "stage": 3, "micro": 1},
    "zero2": {"kind": "zero", "stage": 2, "micro": 1},
    "zero3-m4": {"kind": "zero", "stage": 3, "micro": 4},
    "pipe-ckpt": {"kind": "pipe", "pipe": 2, "data": 1, "micro": 1, "grad_ckpt": True},
    "zero3-ckpt": {"kind": "zero", "stage": 3, "micro": 1, "grad_ckpt": True},
}
THROUGHPUT_ARMS = ["pipe", "zero3", "zero2", "zero3-m4"]
LOSS_TOLERANCE = 1e-4


def throughput_job(seq_len: int, arms: list[str], *, warmup: int, steps: int, model: str) -> dict[str, Any]:
    return {"model": model, "seq_len": seq_len, "global_rows": GLOBAL_ROWS, "seed": 0, "warmup": warmup,
            "steps": steps, "init": "same", "runners": [{"name": a, **ARMS[a]} for a in arms]}


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """tokens/s per arm (mean step time over timed rounds), spreads, paired per-round ratios."""
    job = result["job"]
    tokens = job["global_rows"] * job["seq_len"]
    arms: dict[str, Any] = {}
    for name, times in result["step_s"].items():
        s = stats(times)
        arms[name] = {"tokens_per_s": tokens / s["mean"], "step_s": s,
                      "tokens_per_s_per_step": [tokens / t for t in times]}
    first = {name: losses[0] for name, losses in result["losses"].items()}
    spread = max(first.values()) - min(first.values())
    if spread > LOSS_TOLERANCE:
        raise RuntimeError(f"first-step losses differ across arms: {first}; the arms do not train the same "
                           f"model on the same data")
    out = {"seq_len": job["seq_len"], "tokens_per_step": tokens, "arms": arms, "first_loss": first}
    for other in ("zero3", "zero2", "zero3-m4"):
        if "pipe" in arms and other in arms:
            paired = np.asarray(result["step_s"][other]) / np.asarray(result["step_s"]["pipe"])
            out[f"pipe/{other}"] = {"ratio": arms["pipe"]["tokens_per_s"] / arms[other]["tokens_per_s"],
                                    "paired": stats(paired.tolist())}
    return out


def print_throughput(summary: dict[str, Any]) -> None:
    for name in ARMS:
        if name not in summary["arms"]:
            continue
        arm = summary["arms"][name]
        s = arm["step_s"]
        print(f"{name:9s} tokens/s: {arm['tokens_per_s']:8.0f}   step {s['mean']:.3f} s "
              f"{pct(s['std'], s['mean'])} "
              f"(min {s['min']:.3f}, max {s['max']:.3f}, n={s['n']})")


def run_throughput(seq_len: int, arms: list[str], *, warmup: int, steps: int, model: str) -> dict[str, Any]:
    done = launch(throughput_job(seq_len, arms, warmup=warmup, steps=steps, model=model), procs=2, threads=1)
    summary = summarize(done.result)
    summary["wall_s"] = done.seconds
    summary["versions"] = done.result["versions"]
    summary["breakdown"] = {r["rank"]: {n: v.get("instr_s") or v.get("phase_s")
                                        for n, v in r["runners"].items()}
                            for r in done.result["ranks"]}
    return summary


# ---------------------------------------------------------------------------------------------
# memory: one launch per (arm, seq len), peak RSS per rank


def run_memory(seq_len: int, arm: str, *, model: str) -> dict[str, Any]:
    """Peak RSS of each rank over a warm-up and a timed step, above its RSS before the model was
    built. Weights are built the memory-lean way for each arm (the pipeline materialises only its
    stage; ZeRO-3 builds under deepspeed.zero.Init)."""
    spec = {"name": arm, **ARMS[arm]}
    job = {"model": model, "seq_len": seq_len, "global_rows": GLOBAL_ROWS, "seed": 0, "warmup": 1, "steps": 1,
           "init": "native", "memory": True, "runners": [spec]}
    result = launch(job, procs=2, threads=1).result
    added = [r["peak_rss"] - r["rss_before_build"] for r in result["ranks"]]
    return {"seq_len": seq_len, "arm": arm, "added_peak_bytes": added,
            "max_added_bytes": max(added), "peak_rss": [r["peak_rss"] for r in result["ranks"]],
            "step_s": result["step_s"][arm]}


def longest_under(points: list[tuple[int, float]], budget: float) -> str:
    """Longest sequence whose peak fits `budget`: peak(T) = a + bT + cT^2 fitted to the measured
    points (least squares), first crossing searched from the shortest measured T in steps of 64.
    "~" marks an extrapolation past the longest measured T, "<" a budget below every point."""
    points = sorted(points)
    t = np.asarray([p[0] for p in points], dtype=np.float64)
    m = np.asarray([p[1] for p in points], dtype=np.float64)
    if budget < m[0]:
        return f"< {int(t[0])}"
    coef = np.polyfit(t, m, 2 if len(points) >= 3 else 1)
    grid = np.arange(t[0], 1 << 17, 64, dtype=np.float64)
    over = np.nonzero(np.polyval(coef, grid) > budget * (1 + 1e-9))[0]
    longest = grid[over[0] - 1] if len(over) and over[0] > 0 else grid[-1] if not len(over) else t[0]
    return f"{'~' if longest > t[-1] else ''}{int(longest)}"


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one sequence length (256), 4 arms, ~1 minute")
    parser.add_argument("--model", default="bench", help="preset in bench/_common.py MODELS")
    parser.add_argument("--seq-lens", type=int, nargs="*", default=[256, 512, 1024])
    parser.add_argument("--memory-seq-lens", type=int, nargs="*", default=[256, 512, 1024, 2048])
    parser.add_argument("--arms", nargs="+", default=THROUGHPUT_ARMS, choices=list(ARMS))
    parser.add_argument("--memory-arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed rounds (ZeRO-3's second step is still slow)")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default 5 quick, 6 sweep)")
    parser.add_argument("--budgets-gib", type=float, nargs="+", default=[0.75, 1.0, 1.5],
                        help="per-rank memory budgets (above the process baseline) for the "
                             "longest-sequence table")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--svg", type=Path,
                        help="write a tokens/s vs sequence length plot here (and *_memory.svg)")
    parser.add_argument("--from-json", type=Path,
                        help="print tables and plots of an earlier --json run; run nothing")
    args = parser.parse_args(argv)
    if args.from_json:
        report = json.loads(args.from_json.read_text())
        print_tables(report, args.budgets_gib)
        if args.svg:
            write_plots(report, args.svg)
        if report["throughput"]:
            print_ratios(report["throughput"])
        return 0
    if args.quick:
        args.seq_lens, args.memory_seq_lens = [256], []
    steps = args.steps or (5 if args.quick else 6)
    print(f"model {args.model}: {param_count(args.model) / 1e6:.1f} M parameters; global batch "
          f"{GLOBAL_ROWS} rows; 2 ranks x 1 thread; arms {', '.join(args.arms)}", flush=True)
    report: dict[str, Any] = {"throughput": [], "memory": []}
    for seq in args.seq_lens:
        print(f"\n== seq len {seq}: {GLOBAL_ROWS * seq} tokens per step, {args.warmup} warm-up + "
              f"{steps} timed rounds ==", flush=True)
        summary = run_throughput(seq, args.arms, warmup=args.warmup, steps=steps, model=args.model)
        report["throughput"].append(summary)
        print_throughput(summary)
        save(report, args.json)
    for seq in args.memory_seq_lens:
        for arm in args.memory_arms:
            m = run_memory(seq, arm, model=args.model)
            report["memory"].append(m)
            print(f"memory seq {seq:5d} {arm:10s}: peak above baseline per rank "
                  f"{', '.join(f'{b / 2**20:.0f}' for b in m['added_peak_bytes'])} MiB", flush=True)
            save(report, args.json)
    if args.svg:
        write_plots(report, args.svg)
    if not args.quick:
        print_tables(report, args.budgets_gib)
    if report["throughput"]:
        print_ratios(report["throughput"])
    return 0


def print_ratios(throughput: list[dict[str, Any]]) -> None:
    """The contract line comes last; in a sweep it is for the shortest sequence (256 by default,
    the seed's table and the --quick setting); every length's ratios are in the table above."""
    chosen = min(throughput, key=lambda s: s["seq_len"])
    for other in ("zero2", "zero3-m4", "zero3"):
        if f"pipe/{other}" not in chosen:
            continue
        r = chosen[f"pipe/{other}"]
        spread = (f"per-round median {r['paired']['median']:.3f}, range {r['paired']['min']:.3f}-"
                  f"{r['paired']['max']:.3f}, seq len {chosen['seq_len']}")
        if other == "zero3":
            print(f"  ({spread})")
            print(f"pipe/zero3 throughput ratio: {r['ratio']:.3f}")
        else:
            print(f"pipe/{other} throughput ratio: {r['ratio']:.3f} ({spread})")


def save(report: dict[str, Any], path: Path | None) -> None:
    """Every figure so far (rewritten after each launch, so a late failure loses nothing)."""
    if path is not None:
        path.write_text(json.dumps(report, indent=1))


def print_tables(report: dict[str, Any], budgets: list[float]) -> None:
    rows = []
    for s in report["throughput"]:
        for name in [a for a in ARMS if a in s["arms"]]:
            arm = s["arms"][name]
            ratio = s.get(f"pipe/{name}", {}).get("ratio")
            rows.append([s["seq_len"], name, f"{arm['tokens_per_s']:.0f}",
                         f"{arm['step_s']['mean']:.3f} {pct(arm['step_s']['std'], arm['step_s']['mean'])}",
                         f"{ratio:.2f}" if ratio else ""])
    if rows:
        print("\n" + md_table(["seq len", "arm", "tokens/s", "step s (± std)", "pipe / arm"], rows))
    if not report["memory"]:
        return
    by_arm: dict[str, list[tuple[int, float]]] = {}
    for m in report["memory"]:
        by_arm.setdefault(m["arm"], []).append((m["seq_len"], m["max_added_bytes"]))
    seqs = sorted({m["seq_len"] for m in report["memory"]})
    mem_rows = [[arm] + [f"{dict(pts).get(t, float('nan')) / 2**20:.0f}" for t in seqs]
                for arm, pts in by_arm.items()]
    print("\npeak RSS above baseline, max over ranks (MiB)\n" + md_table(["arm", *map(str, seqs)], mem_rows))
    fit_rows = []
    for arm, pts in by_arm.items():
        fit_rows.append([arm] + [longest_under(pts, b * 2**30) for b in budgets])
    print("\nlongest sequence under a per-rank budget (quadratic fit of the points above)\n"
          + md_table(["arm", *[f"{b:g} GiB" for b in budgets]], fit_rows))


def write_plots(report: dict[str, Any], path: Path) -> None:
    """Throughput vs seq len at `path`; peak memory vs seq len beside it (`*_memory.svg`)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for name in ARMS:  # fixed order: the same colour per arm in both plots
        for s in report["throughput"]:
            if name in s["arms"]:
                series.setdefault(name, []).append((s["seq_len"], s["arms"][name]["tokens_per_s"]))
    if len({s["seq_len"] for s in report["throughput"]}) > 1:
        path.write_text(svg_lines(series, title="Training throughput, 2 CPU ranks (llama, 10.5 M params)",
                                  xlabel="sequence length (global batch 8 rows)", ylabel="tokens/s",
                                  log2_x=True))
    memory: dict[str, list[tuple[float, float]]] = {}
    for name in ARMS:
        for m in report["memory"]:
            if m["arm"] == name:
                memory.setdefault(name, []).append((m["seq_len"], m["max_added_bytes"] / 2**20))
    if memory:
        path.with_name(path.stem + "_memory.svg").write_text(
            svg_lines(memory, title="Peak memory per rank above the process baseline", log2_x=True,
                      xlabel="sequence length (global batch 8 rows)", ylabel="MiB (max over ranks)"))


if __name__ == "__main__":
    sys.exit(main())
