"""A model as the pipeline sees it: family + layer arguments + the HF config, and the modules
that make up each pipeline layer. Shared by the DeepSpeed pipeline and the one-process stack."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from models.common import LayerIO, ModelConfigError, select_trained
from models.registry import Family, family_for


@dataclass(frozen=True)
class BuildOptions:
    """How layers are built for training (not part of the checkpoint)."""

    grad_ckpt: bool = False  # recompute each block's activations in backward
    packed: bool = False  # rows hold several samples: build block-diagonal attention masks


@dataclass(frozen=True)
class ModelSpec:
    family: Family
    args: Any
    hf_config: PretrainedConfig

    @property
    def num_blocks(self) -> int:
        return self.args.num_layers

    @property
    def num_layers(self) -> int:
        """Pipeline layers: embedding + blocks + (final norm and head)."""
        return self.args.num_layers + 2

    @property
    def tied(self) -> bool:
        return bool(self.args.tie_embeddings)

    @property
    def model_type(self) -> str:
        return self.hf_config.model_type


def spec_from_config(config: PretrainedConfig) -> ModelSpec:
    family = family_for(getattr(config, "model_type", None))
    return ModelSpec(family=family, args=family.args_from_hf(config), hf_config=config)


def load_spec(model_dir: str | Path) -> ModelSpec:
    """Read config.json of an HF or pipeline dir (no weights are touched)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelConfigError(
            f"{model_dir} has no config.json; give an HF model dir saved with save_pretrained, or a "
            f"pipeline dir written by `convert_model.py hg_to_pp`")
    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except ValueError as err:  # transformers: unknown model_type and the like
        raise ModelConfigError(f"{model_dir}/config.json cannot be read: {err}") from err
    return spec_from_config(config)


# ---------------------------------------------------------------------------------------------
# The modules of each pipeline layer. Layer N+1 is two modules (final norm, then the head), so
# that a tied head can be DeepSpeed's TiedLayerSpec of the embedding while the norm stays its own.


@dataclass(frozen=True)
class Slot:
    """One module of a pipeline layer: which layer, what kind, and how to build it."""

    layer: int
    kind: str  # "embed" | "block" | "final_norm" | "lm_head" | "tied_head"
    cls: type[nn.Module]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def build(self) -> nn.Module:
        return self.cls(*self.args, **self.kwargs)


def slots(spec: ModelSpec, options: BuildOptions) -> list[Slot]:
    """Slots in forward order: embed, blocks, final norm, head (N + 3 modules for N + 2 layers).
    A tied head is a second use of the embedding module, built from the same class."""
    fam, args, n = spec.family, spec.args, spec.num_blocks
    out = [Slot(0, "embed", fam.embedding, (args,))]
    block_kw = {"grad_ckpt": options.grad_ckpt, "packed": options.packed}
    out += [Slot(i + 1, "block", fam.block, (args, i), block_kw) for i in range(n)]
    out.append(Slot(n + 1, "final_norm", fam.final_norm, (args,)))
    if spec.tied:
        out.append(Slot(n + 1, "tied_head", fam.embedding, (args,)))
    else:
        out.append(Slot(n + 1, "lm_head", fam.lm_head, (args,)))
    return out


def tied_head_forward(embedding: nn.Module, inputs: LayerIO) -> tuple[torch.Tensor, torch.Tensor]:
    """The head of a tied model: project trained positions with the input embedding matrix."""
    hidden, _, _, targets = inputs
    hidden, targets = select_trained(hidden, targets)
    return F.linear(hidden, embedding.embed.weight), targets  # [n, V], [n]


def tied_head_logits(embedding: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return F.linear(hidden, embedding.embed.weight)


def layer_costs(spec: ModelSpec, *, seq_len: int, grad_ckpt: bool) -> list[float]:
    """Relative compute per pipeline layer (FLOPs per token, forward + backward), used to
    balance `parts: "auto"`. Backward costs twice the forward; grad ckpt adds one more forward
    to the blocks only. The embedding is a lookup: nearly free in compute."""
    args = spec.args
    block = spec.family.block_flops_per_token(args, seq_len) * (4.0 if grad_ckpt else 3.0)
    head = 2.0 * args.hidden_size * args.vocab_size * 3.0
    embed = 2.0 * args.hidden_size * 3.0
    return [embed, *([block] * spec.num_blocks), head]
