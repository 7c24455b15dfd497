"""Chat with an HF model dir, tensor parallel over the launched ranks (DeepSpeed inference, AutoTP).

    deepspeed [--num_gpus N] demo.py --model HF_DIR [--prompt TEXT] [--max-new-tokens K]
                                     [--temperature T] [--top-p P] [--system TEXT] [--output-json FILE]
    python demo.py --model HF_DIR ...          (one process, no launcher)

Without --prompt: an interactive multi-turn chat (/reset, /exit or Ctrl-D). The prompt is the
model's own chat template with the generation prompt, exactly as in training. --temperature 0 is
greedy decoding, and greedy output is the same on N ranks as on one. Runs on GPUs (nccl) and on
the CPU (gloo). The logic lives in inference.py.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import TextIO

from inference import (DTYPES, Chat, DemoError, Ranks, SamplingOptions, broadcast_text, check_engine_options,
                       check_model_dir, context_limit, has_chat_template, init_engine, interactive,
                       load_model, load_tokenizer, ranks_from_env, resolve_dtype, setup_device,
                       warn_no_template)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF model dir (config.json, weights, tokenizer)")
    parser.add_argument("--prompt", help="answer this one message and exit; without it: interactive chat")
    parser.add_argument("--system", help="system message placed before the conversation")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (default 256)")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling, in (0, 1] (default 0.9)")
    parser.add_argument("--top-k", type=int, default=None,
                        help="top-k sampling, 0 = off (default: the model's generation_config)")
    parser.add_argument("--seed", type=int, default=1234, help="sampling seed, the same on every rank")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="auto: fp32 on the CPU, the model's bf16/fp16 on GPUs (default auto)")
    parser.add_argument("--kernel-inject", action="store_true",
                        help="DeepSpeed's fused inference kernels instead of AutoTP (CUDA; llama, bloom)")
    parser.add_argument("--output-json", metavar="FILE",
                        help="rank 0 writes one JSON object per turn: prompt, prompt_ids, output_ids, text")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, SamplingOptions]:
    """Parse and validate everything that needs no model loaded."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = SamplingOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        args.model_type = check_model_dir(args.model)
        if args.output_json and not Path(args.output_json).resolve().parent.is_dir():
            raise DemoError(f"--output-json {args.output_json!r}: its folder does not exist; create it first")
    except DemoError as err:
        parser.error(str(err))
    return args, options


def quiet_other_ranks(ranks: Ranks) -> None:
    """Only rank 0 talks: the others drop stdout (DeepSpeed prints there too) and info logs."""
    if ranks.is_main:
        return
    sys.stdout = open(os.devnull, "w")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def build_chat(args: argparse.Namespace, options: SamplingOptions, ranks: Ranks,
               record: TextIO | None) -> Chat:
    """Load, shard and wrap the model; every rank does the same."""
    import transformers

    device = setup_device(ranks)
    tokenizer = load_tokenizer(args.model)
    config = transformers.AutoConfig.from_pretrained(args.model)
    dtype = resolve_dtype(args.dtype, config_dtype=getattr(config, "dtype", None), device=device)
    check_engine_options(model_type=args.model_type, dtype=dtype, kernel_inject=args.kernel_inject)
    context = context_limit(config, tokenizer)
    engine = init_engine(load_model(args.model, dtype), world_size=ranks.world_size, dtype=dtype,
                         kernel_inject=args.kernel_inject, max_tokens=context)
    transformers.set_seed(options.seed)  # after init_inference, which broadcasts rank 0's RNG state
    if not has_chat_template(tokenizer):
        warn_no_template(args.model, ranks)
    if ranks.is_main:
        print(f"{args.model}: {args.model_type}, {ranks.world_size} rank(s), {dtype}, {device}, "
              f"{'greedy' if options.greedy else f'temperature {options.temperature}'}", file=sys.stderr)
    return Chat(engine=engine, tokenizer=tokenizer, ranks=ranks, device=device, options=options,
                context=context, system=args.system, record=record)


def run(args: argparse.Namespace, options: SamplingOptions, ranks: Ranks) -> None:
    with contextlib.ExitStack() as stack:
        record = None
        if args.output_json and ranks.is_main:
            record = stack.enter_context(open(args.output_json, "w", encoding="utf-8"))
        chat = build_chat(args, options, ranks, record)
        if args.prompt is None:
            interactive(chat)
        else:
            chat.turn(broadcast_text(args.prompt, ranks))


def close_process_group(*, wait_for_others: bool) -> None:
    """End the process group (after a barrier when every rank finished normally; a failing rank
    must not wait for the others) and free DeepSpeed's CPU all-reduce buffer."""
    import torch.distributed as dist

    from training.cpu_comm import release_shm_buffer

    if dist.is_available() and dist.is_initialized():
        if wait_for_others:
            dist.barrier()
        dist.destroy_process_group()
    release_shm_buffer()


def main(argv: list[str] | None = None) -> int:
    args, options = parse_args(argv)
    ranks = ranks_from_env()
    quiet_other_ranks(ranks)
    finished = False
    try:
        run(args, options, ranks)
        finished = True
    except DemoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2  # a user error, as in convert_model.py and train_ds.py
    except KeyboardInterrupt:
        return 130
    finally:
        close_process_group(wait_for_others=finished)
    return 0


if __name__ == "__main__":
    sys.exit(main())
