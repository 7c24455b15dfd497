"""Peak memory and time of hg_to_pp and pp_to_hg on a generated checkpoint of >= 1 GB.

    python bench/convert_memory.py [--hidden 2048 --blocks 12] [--out runs/bench_convert]

Each conversion runs in a fresh process (`convert_model.py`, as a user runs it); its peak RSS is
the child's ru_maxrss. Compared with: the largest pipeline layer (the goal is peak RSS <= 2 x
largest layer + 500 MB, the 500 MB covering Python + torch + transformers) and a plain copy of
the same bytes (goal: time <= 2 x the copy). The copy is timed after the conversions, with the
files in the page cache as they were for the conversions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MB = 1024 * 1024


def generate(out: Path, hidden: int, blocks: int) -> None:
    """A random llama checkpoint in bf16, sharded, with the shipped tokenizer (in a child process,
    so its memory does not count against the conversions)."""
    code = f"""
import shutil, torch
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(hidden_size={hidden}, intermediate_size={int(hidden * 2.75)}, num_hidden_layers={blocks},
                  num_attention_heads={hidden // 128}, num_key_value_heads={hidden // 128}, vocab_size=32000)
with torch.device("meta"):
    model = LlamaForCausalLM(cfg)
model = model.to_empty(device="cpu").to(torch.bfloat16)
for p in model.parameters():
    p.data.normal_(0, 0.02)
model.save_pretrained("{out}", max_shard_size="500MB")
for f in Path("{REPO / 'configs' / 'tiny-llama'}").glob("tokenizer*"):
    shutil.copyfile(f, Path("{out}") / f.name)
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def run_child(args: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one conversion in a fresh process."""
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child replaces itself with the command: ru_maxrss is then its own peak
        os.execv(sys.executable, [sys.executable, *args])
    _, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{args} failed")
    return seconds, usage.ru_maxrss / 1024


def dir_bytes(path: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in path.glob(pattern))


def plain_copy(src: Path, dst: Path, pattern: str) -> float:
    dst.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for f in sorted(src.glob(pattern)):
        shutil.copyfile(f, dst / f.name)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_convert")
    args = parser.parse_args()
    os.chdir(REPO)  # the children import the project from here
    shutil.rmtree(args.out, ignore_errors=True)
    hf, pp, back = args.out / "hf", args.out / "pp", args.out / "back"
    generate(hf, args.hidden, args.blocks)
    model_mb = dir_bytes(hf, "*.safetensors") / MB
    baseline = run_child(["-c", "import torch, transformers, safetensors, deepspeed, models.convert"])
    to_pp = run_child([str(REPO / "convert_model.py"), "hg_to_pp", "--input-path", str(hf), "--save-path", str(pp),
                       "--quiet"])
    largest_mb = max(p.stat().st_size for p in pp.glob("layer_*.safetensors")) / MB
    to_hg = run_child([str(REPO / "convert_model.py"), "pp_to_hg", "--input-path", str(pp), "--save-path", str(back),
                       "--quiet"])
    copy_hf = plain_copy(hf, args.out / "copy_hf", "*.safetensors")
    copy_pp = plain_copy(pp, args.out / "copy_pp", "*.safetensors")
    budget = 2 * largest_mb + 500
    result = {
        "model_mb": round(model_mb), "largest_layer_mb": round(largest_mb), "rss_budget_mb": round(budget),
        "imports_only": {"s": round(baseline[0], 2), "peak_rss_mb": round(baseline[1])},
        "hg_to_pp": {"s": round(to_pp[0], 2), "peak_rss_mb": round(to_pp[1]), "copy_s": round(copy_hf, 2)},
        "pp_to_hg": {"s": round(to_hg[0], 2), "peak_rss_mb": round(to_hg[1]), "copy_s": round(copy_pp, 2)},
    }
    print(json.dumps(result, indent=2))
    for name, (seconds, rss), copy_s in (("hg_to_pp", to_pp, copy_hf), ("pp_to_hg", to_hg, copy_pp)):
        work = seconds - baseline[0]  # the conversion itself, without interpreter start and imports
        print(f"{name}: peak RSS {rss:.0f} MB (budget {budget:.0f} MB: {'ok' if rss <= budget else 'OVER'}); "
              f"{seconds:.1f} s in all, {work:.1f} s after imports vs plain copy {copy_s:.1f} s "
              f"({work / copy_s:.2f}x; goal <= 2x)")
    shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
