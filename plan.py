"""Plan GPU memory for pipeline-parallel training: per-stage estimates, a suggested
model_topo.parts, whether it fits, and the fewest GPUs that would (docs/plan.md).

    python plan.py --model HF_DIR_OR_CONFIG --gpus N --gpu-mem GB --seq-len L --micro-batch B \\
        [--grad-ckpt] [--optimizer adamw|lion] [--offload] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from models.common import ModelConfigError
from models.partition import PartitionError
from planner.advise import Request, make_plan
from planner.memory import DTYPES, OPTIMIZERS, PlanError, PlanOptions
from planner.profile import load_model_spec, model_profile
from planner.report import render

USER_ERRORS = (ModelConfigError, PartitionError, PlanError)


def parse_parts(text: str) -> list[int]:
    """'1,5,5,1', '[1, 5, 5, 1]' or '1 5 5 1' -> [1, 5, 5, 1]."""
    items = [t for t in re.split(r"[\s,]+", text.strip().strip("[]")) if t]
    if not items or not all(re.fullmatch(r"-?\d+", t) for t in items):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of layer counts; write e.g. 1,5,5,5,5,5,5,1")
    return [int(t) for t in items]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model dir, pipeline dir, or a config.json path")
    p.add_argument("--gpus", type=int, required=True, help="GPUs to train on (pipe x data)")
    p.add_argument("--gpu-mem", type=float, required=True, help="memory per GPU in GiB (nvidia-smi MiB / 1024)")
    p.add_argument("--seq-len", type=int, required=True, help="max_seq_len: tokens per row")
    p.add_argument("--micro-batch", type=int, default=1, help="train_micro_batch_size_per_gpu (default 1)")
    p.add_argument("--grad-ckpt", action="store_true", help="use_grad_ckpt: recompute each block in backward")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--dtype", choices=DTYPES, default="fp16", help="training dtype (default fp16, as on V100)")
    p.add_argument("--zero", type=int, choices=(0, 1), default=None, help="ZeRO stage (default 0; 1 with --offload)")
    p.add_argument("--offload", action="store_true", help="ZeRO-1 with the optimizer offloaded to host memory")
    p.add_argument("--pipe", type=int, default=None, help="pipeline stages (default: the shortest pipeline dividing --gpus that fits)")
    p.add_argument("--parts", type=parse_parts, default=None, help="evaluate this split, e.g. 1,5,5,5,5,5,5,1")
    p.add_argument("--grad-accum", type=int, default=None,
                   help="micro-batches per step (default: at least the pipeline depth)")
    p.add_argument("--overhead", type=float, default=2.0,
                   help="GiB per GPU for CUDA context, NCCL and fragmentation (default 2)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="for host memory per node with --offload")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (memory in bytes)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        opt = PlanOptions(seq_len=args.seq_len, gpu_mem_gib=args.gpu_mem, micro_batch=args.micro_batch,
                          grad_ckpt=args.grad_ckpt, optimizer=args.optimizer, dtype=args.dtype,
                          zero=args.zero if args.zero is not None else int(args.offload), offload=args.offload,
                          overhead_gib=args.overhead, grad_accum=args.grad_accum, gpus_per_node=args.gpus_per_node)
        req = Request(gpus=args.gpus, pipe=args.pipe, parts=args.parts)
        profile = model_profile(load_model_spec(args.model), seq_len=opt.seq_len)
        plan = make_plan(profile, opt, req)
    except USER_ERRORS as err:
        parser.exit(2, f"plan.py: error: {err}\n")  # argparse's status for bad input; no traceback
    sys.stdout.write(json.dumps(plan, indent=1) + "\n" if args.json else render(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
