"""Train a pipeline dir on a pipe x data topology:

    deepspeed [--num_gpus N | --hostfile FILE] train_ds.py --config configs/X.json [--set KEY=VALUE ...]

Rerunning the same command resumes from the newest complete checkpoint in save_path.
--set changes config keys for this run without editing the file (dotted keys reach into
DeepSpeed's blocks: --set save_path=runs/try2 optimizer.params.lr=1e-5 model_topo.parts=[2,2]).
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the JSON config (toolkit keys beside DeepSpeed's)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys for this run (JSON values; dotted keys for nested ones)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # added by the launcher
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from training.config import load_config
    from training.trainer import USER_ERRORS, run

    try:
        run(load_config(args.config, args.set))
    except USER_ERRORS as err:
        # Every rank meets the same config/data error; rank 0 speaks for them.
        if os.environ.get("RANK", "0") == "0" or getattr(err, "located", False):
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
