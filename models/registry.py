"""From a transformers config to the family that builds it: one registry, one error."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from torch import nn

from models import bloom, llama
from models.common import ModelConfigError


@dataclass(frozen=True)
class Family:
    """A model family: its layer classes, config reader and HF weight-name table."""

    name: str
    model_types: tuple[str, ...]
    hf_architecture: Mapping[str, str]  # model_type -> transformers class written to config.json
    args_from_hf: Callable[[Any], Any]
    embedding: type[nn.Module]
    block: type[nn.Module]
    final_norm: type[nn.Module]
    lm_head: type[nn.Module]
    from_hf: Mapping[str, tuple[str, str] | None]
    block_flops_per_token: Callable[[Any, int], float]
    hf_prefix: str = ""  # an optional prefix of the HF keys (bloom's "transformer.")


def _family(module: ModuleType, **kw: Any) -> Family:
    return Family(args_from_hf=module.args_from_hf, embedding=module.Embedding, block=module.Block,
                  final_norm=module.FinalNorm, lm_head=module.LMHead, from_hf=module.FROM_HF,
                  block_flops_per_token=module.block_flops_per_token, **kw)


FAMILIES: tuple[Family, ...] = (
    _family(llama, name="llama", model_types=("llama", "mistral", "qwen2"),
            hf_architecture={"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                             "qwen2": "Qwen2ForCausalLM"}),
    _family(bloom, name="bloom", model_types=("bloom",), hf_architecture={"bloom": "BloomForCausalLM"},
            hf_prefix=bloom.HF_PREFIX),
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for f in FAMILIES for t in f.model_types)


def family_for(model_type: str | None) -> Family:
    """The family that builds HF `model_type`; an unsupported type lists the supported ones."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ModelConfigError(
        f"model_type {model_type!r} is not supported; supported model types: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}")
