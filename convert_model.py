"""Convert between Hugging Face checkpoints and pipeline dirs.

    python convert_model.py hg_to_pp --input-path HF_DIR_OR_HUB_NAME --save-path PP_DIR
    python convert_model.py pp_to_hg --input-path PP_DIR_OR_TRAINING_SAVE_PATH --save-path HF_DIR
"""

from __future__ import annotations

import argparse
import re
import sys

from models.common import ModelConfigError
from models.convert import ConversionError, hg_to_pp, pp_to_hg
from models.names import WeightNameError
from models.pipedir import PipelineDirError

USER_ERRORS = (ConversionError, PipelineDirError, ModelConfigError, WeightNameError)


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '123' (bytes) -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 5GB, 500MB or a byte count")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    to_pp = sub.add_parser("hg_to_pp", help="HF checkpoint (dir or Hub name) -> pipeline dir (one file per layer)")
    to_pp.add_argument("--input-path", required=True, help="HF model dir with config, weights and tokenizer")
    to_pp.add_argument("--save-path", required=True, help="pipeline dir to write")
    to_hg = sub.add_parser("pp_to_hg", help="pipeline dir or training save_path -> HF model dir")
    to_hg.add_argument("--input-path", required=True,
                       help="pipeline dir, or a training save_path (its newest saved weights are taken)")
    to_hg.add_argument("--save-path", required=True, help="HF model dir to write")
    to_hg.add_argument("--max-shard-size", type=parse_size, default=None,
                       help="largest safetensors shard (e.g. 5GB); default: the largest layer, so memory "
                            "stays near one layer")
    to_hg.add_argument("--lm-head-copy", action="store_true",
                       help="also store a tied output embedding as lm_head.weight (some inference servers, "
                            "e.g. text-generation-inference with bloom, need it)")
    for p in (to_pp, to_hg):
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "hg_to_pp":
            out = hg_to_pp(args.input_path, args.save_path, progress=not args.quiet)
        else:
            out = pp_to_hg(args.input_path, args.save_path, max_shard_bytes=args.max_shard_size,
                           lm_head_copy=args.lm_head_copy, progress=not args.quiet)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
