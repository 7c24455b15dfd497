"""Build a randomly initialised HF checkpoint from a config + tokenizer dir (no weights needed):

    python -m models.init_hf --config configs/tiny-llama --save-path runs/tiny-hf

The quickstart uses it to make the shipped tiny default into a real checkpoint that then goes
through the same hg_to_pp -> train -> pp_to_hg path as a downloaded model.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from models.convert import TOKENIZER_FILES
from models.registry import family_for


def init_hf(config_dir: Path, save_path: Path, *, seed: int = 0) -> Path:
    config = AutoConfig.from_pretrained(str(config_dir))
    family_for(config.model_type)  # fail early, listing the supported types
    tokenizer = AutoTokenizer.from_pretrained(str(config_dir))
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"{config_dir}: the tokenizer has {len(tokenizer)} tokens but config.json vocab_size is "
                         f"{config.vocab_size}; raise vocab_size to at least {len(tokenizer)}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    save_path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(save_path))
    for name in TOKENIZER_FILES:  # verbatim, so the tokenizer is exactly the shipped one
        if (config_dir / name).is_file():
            shutil.copyfile(config_dir / name, save_path / name)
    return save_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="dir with config.json and tokenizer files")
    parser.add_argument("--save-path", required=True, type=Path, help="HF model dir to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        out = init_hf(args.config, args.save_path, seed=args.seed)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
