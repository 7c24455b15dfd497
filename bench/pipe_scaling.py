"""Pipeline scaling: 1 stage vs 2 stages at fixed total cores, over micro-batch counts M, against
the 1F1B bubble model, with where each stage's time goes.

    python bench/pipe_scaling.py                     # M = 1 2 4 8 16, seq 256, ~3 minutes
    python bench/pipe_scaling.py --micro-counts 4 16 --steps 3 --json out.json --svg docs/x.svg

Launch A, 2 processes x 1 thread (all runners interleaved round by round):
  single   each rank trains the whole model alone (our layers, torch AdamW, no DeepSpeed) on the
           step's M rows: the work one core does per row, under the same load as the others
  pp2      our StagedPipeline, 2 stages (parts "auto"), DeepSpeed 1F1B, M micro-batches of 1 row
  dp2      the same engine with 1 stage x 2 data-parallel ranks (M/2 micro-batches each; even M)
Launch B, 1 process x 2 threads (the same 2 cores in one stage):
  pipe1    the DeepSpeed engine with one stage, M micro-batches
The bubble model predicts pp2 = 2 x (single tokens/s per rank) x M / (M + P - 1), P = 2 (stages
perfectly balanced, communication free); efficiency = measured / predicted.
More stages than cores would time-share cores, so P stops at the core count (2 here).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    launch,
    matmul_peak_flops,
    md_table,
    param_count,
    pct,
    stats,
    svg_lines,
    train_flops_per_token,
)

P = 2


def job_a(ms: list[int], *, seq: int, warmup: int, steps: int, model: str) -> dict[str, Any]:
    runners: list[dict[str, Any]] = []
    for m in ms:
        runners.append({"name": f"single-M{m}", "kind": "single", "micro": 1, "global_rows": m,
                        "share": f"single-M{ms[0]}"})
    for m in ms:
        runners.append({"name": f"pp2-M{m}", "kind": "pipe", "pipe": 2, "data": 1, "micro": 1,
                        "global_rows": m, "share": f"pp2-M{ms[0]}"})
    even = [m for m in ms if m % 2 == 0]
    for m in even:
        runners.append({"name": f"dp2-M{m}", "kind": "pipe", "pipe": 1, "data": 2, "micro": 1,
                        "global_rows": m, "share": f"dp2-M{even[0]}"})
    return {"model": model, "seq_len": seq, "global_rows": max(ms), "seed": 0, "warmup": warmup,
            "steps": steps, "init": "same", "runners": runners}


def job_b(ms: list[int], *, seq: int, warmup: int, steps: int, model: str) -> dict[str, Any]:
    runners = [{"name": f"pipe1-M{m}", "kind": "pipe", "pipe": 1, "data": 1, "micro": 1, "global_rows": m,
                "share": f"pipe1-M{ms[0]}"} for m in ms]
    return {"model": model, "seq_len": seq, "global_rows": max(ms), "seed": 0, "warmup": warmup,
            "steps": steps, "init": "same", "runners": runners}


def tokens_per_s(result: dict[str, Any], name: str, rows: int, *,
                 per_rank_copies: int = 1) -> dict[str, float]:
    seq = result["job"]["seq_len"]
    s = stats(result["step_s"][name])
    return {"tokens_per_s": per_rank_copies * rows * seq / s["mean"], "step_s": s["mean"], "std": s["std"]}


def breakdown(result: dict[str, Any], name: str, m: int) -> list[dict[str, float]]:
    """Seconds per step on each pipeline stage: compute, p2p (send/recv incl. waiting), optimizer
    (incl. the grad-norm all-reduce, which waits for the slower stage), loading, other."""
    steps = result["job"]["steps"]
    step_s = stats(result["step_s"][name])["mean"]
    out = []
    for rank in sorted(result["ranks"], key=lambda r: r["rank"]):
        i = {k: v / steps for k, v in rank["runners"][name]["instr_s"].items()}
        row = {"stage": rank["runners"][name]["stage"],
               "compute": i.get("ForwardPass", 0) + i.get("BackwardPass", 0),
               "p2p": sum(i.get(k, 0) for k in ("SendActivation", "RecvActivation", "SendGrad", "RecvGrad")),
               "optimizer": sum(i.get(k, 0) for k in ("OptimizerStep", "ReduceGrads", "ReduceTiedGrads")),
               "load": i.get("LoadMicroBatch", 0)}
        row["other"] = step_s - sum(row[k] for k in ("compute", "p2p", "optimizer", "load"))
        row["p2p_transfer_est"] = 2 * m * (result["p2p_s"] or 0.0)
        out.append(row)
    return out


def analyse(a: dict[str, Any], b: dict[str, Any] | None, ms: list[int]) -> list[dict[str, Any]]:
    rows = []
    world = a["world"]
    for m in ms:
        single = tokens_per_s(a, f"single-M{m}", m, per_rank_copies=world)
        pp2 = tokens_per_s(a, f"pp2-M{m}", m)
        bubble = m / (m + P - 1)
        row = {"M": m, "single_2cores": single, "pp2": pp2, "bubble_model": bubble,
               "predicted_pp2": single["tokens_per_s"] * bubble,
               "efficiency": pp2["tokens_per_s"] / (single["tokens_per_s"] * bubble),
               "pp2_over_ideal": pp2["tokens_per_s"] / single["tokens_per_s"],
               "breakdown": breakdown(a, f"pp2-M{m}", m)}
        if f"dp2-M{m}" in a["step_s"]:
            row["dp2"] = tokens_per_s(a, f"dp2-M{m}", m)
        if b is not None:
            row["pipe1_2threads"] = tokens_per_s(b, f"pipe1-M{m}", m)
        rows.append(row)
    return rows


def print_mfu(rows: list[dict[str, Any]], *, model: str, seq: int, peak: float) -> None:
    """Model FLOP/s per core of each configuration against the measured 1-thread GEMM rate."""
    per_token = train_flops_per_token(model, seq)
    table = []
    for r in rows:
        cells = [r["M"]]
        for key in ("single_2cores", "pipe1_2threads", "dp2", "pp2"):
            cells.append(f"{100 * r[key]['tokens_per_s'] * per_token / 2 / peak:.0f}%" if key in r else "")
        table.append(cells)
    print(f"\nmodel FLOPs utilisation per core ({per_token / 1e6:.1f} MFLOP per token; 100% = this machine's "
          f"measured fp32 GEMM rate, {peak / 1e9:.0f} GFLOP/s per core)")
    print(md_table(["M", "2 x single", "1 stage, 2 threads", "dp2", "pp2"], table))


def print_tables(rows: list[dict[str, Any]]) -> None:
    table = []
    for r in rows:
        table.append([r["M"], f"{r['single_2cores']['tokens_per_s']:.0f}",
                      f"{r['pipe1_2threads']['tokens_per_s']:.0f}" if "pipe1_2threads" in r else "",
                      f"{r['dp2']['tokens_per_s']:.0f}" if "dp2" in r else "",
                      f"{r['pp2']['tokens_per_s']:.0f} {pct(r['pp2']['std'], r['pp2']['step_s'])}",
                      f"{r['bubble_model']:.3f}", f"{r['pp2_over_ideal']:.3f}",
                      f"{100 * r['efficiency']:.1f}%"])
    print(md_table(["M", "2 x single (1 core each)", "1 stage, 2 threads", "dp2", "pp2 tokens/s (± std)",
                    "bubble model M/(M+1)", "pp2 / 2 x single", "pp2 / bubble model"], table))
    print("\nwhere pp2's step goes, seconds per step per stage (p2p includes waiting; "
          "transfer = ping-pong estimate of the pure hand-offs)")
    table = []
    for r in rows:
        for s in r["breakdown"]:
            table.append([r["M"], s["stage"], f"{r['pp2']['step_s']:.3f}", f"{s['compute']:.3f}",
                          f"{s['p2p']:.3f}",
                          f"{s['p2p_transfer_est']:.3f}", f"{s['optimizer']:.3f}", f"{s['load']:.4f}",
                          f"{s['other']:.3f}", f"{(P - 1) / (r['M'] + P - 1) * r['pp2']['step_s']:.3f}"])
    print(md_table(["M", "stage", "step", "compute", "p2p", "transfer est.", "optimizer", "load", "other",
                    "bubble-model idle"], table))


def write_plot(rows: list[dict[str, Any]], path: Path) -> None:
    series = {"pp2 measured": [(r["M"], r["pp2"]["tokens_per_s"]) for r in rows],
              "bubble model": [(r["M"], r["predicted_pp2"]) for r in rows],
              "2 x single": [(r["M"], r["single_2cores"]["tokens_per_s"]) for r in rows]}
    if all("pipe1_2threads" in r for r in rows):
        series["1 stage, 2 thr"] = [(r["M"], r["pipe1_2threads"]["tokens_per_s"]) for r in rows]
    dp = [(r["M"], r["dp2"]["tokens_per_s"]) for r in rows if "dp2" in r]
    if dp:
        series["dp2"] = dp
    path.write_text(svg_lines(series, title="2-stage pipeline vs bubble model (2 CPU cores)",
                              xlabel="micro-batches per step M (1 row of 256 tokens each)", ylabel="tokens/s",
                              log2_x=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-counts", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--skip-threads", action="store_true", help="skip launch B (1 process x 2 threads)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--svg", type=Path)
    parser.add_argument("--from-json", type=Path,
                        help="print tables and plot of an earlier --json run; run nothing")
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        print_tables(saved["rows"])
        if "gemm_peak_per_core" in saved:
            print_mfu(saved["rows"], model=args.model, seq=args.seq_len, peak=saved["gemm_peak_per_core"])
        if args.svg:
            write_plot(saved["rows"], args.svg)
        return 0
    ms = sorted(args.micro_counts)
    cores = os.cpu_count() or 1
    peak = matmul_peak_flops(threads=1)
    print(f"model {args.model}: {param_count(args.model) / 1e6:.1f} M parameters; seq {args.seq_len}; "
          f"M = {ms}; "
          f"{cores} cores: stages up to {min(cores, 2)} at one core each", flush=True)
    a = launch(job_a(ms, seq=args.seq_len, warmup=args.warmup, steps=args.steps, model=args.model),
               procs=2, threads=1).result
    b = None
    if not args.skip_threads:
        b = launch(job_b(ms, seq=args.seq_len, warmup=args.warmup, steps=args.steps, model=args.model),
                   procs=1, threads=2).result
    rows = analyse(a, b, ms)
    print_tables(rows)
    print_mfu(rows, model=args.model, seq=args.seq_len, peak=peak)
    parts = {r["rank"]: r["runners"][f"pp2-M{ms[0]}"]["parts"] for r in a["ranks"]}
    print(f"\npp2 parts {parts[0]}; p2p hand-off (ping-pong, hidden + 3 int64 tensors): "
          f"{1e3 * (a['p2p_s'] or 0):.2f} ms")
    if args.json:
        saved = {"rows": rows, "raw_a": a, "raw_b": b, "gemm_peak_per_core": peak}
        args.json.write_text(json.dumps(saved, indent=1))
    if args.svg:
        write_plot(rows, args.svg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
