"""Tiny random transformers models of every supported family, built locally (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 128
PAD, BOS, EOS = 3, 1, 2
_DIMS = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)

# name -> (model class, config): one per family variant the project promises to support
VARIANTS = {
    "llama": (LlamaForCausalLM, LlamaConfig(**_DIMS, num_key_value_heads=2, pad_token_id=PAD)),
    "llama_tied": (LlamaForCausalLM, LlamaConfig(
        **_DIMS, num_key_value_heads=1, tie_word_embeddings=True, max_position_embeddings=256,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "llama_bias": (LlamaForCausalLM, LlamaConfig(
        **_DIMS, num_key_value_heads=4, attention_bias=True, mlp_bias=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral": (MistralForCausalLM, MistralConfig(**_DIMS, num_key_value_heads=2, sliding_window=5)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**_DIMS, num_key_value_heads=2, use_sliding_window=True,
                                            sliding_window=6, max_window_layers=1)),
    "bloom": (BloomForCausalLM, BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=VOCAB)),
}


def build_hf_model(name: str, seed: int = 0) -> PreTrainedModel:
    cls, config = VARIANTS[name]
    torch.manual_seed(seed)
    config.initializer_range = 0.1  # larger than the default so logits differ clearly between tokens
    return cls(config).eval()


def save_tokenizer(directory: Path) -> None:
    """A word-level tokenizer over VOCAB tokens `w0`..: enough for conversion and training tests."""
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=f"w{BOS}", eos_token=f"w{EOS}",
                            pad_token=f"w{PAD}").save_pretrained(str(directory))


def save_hf_model(name: str, directory: Path, seed: int = 0, **save_kwargs: object) -> PreTrainedModel:
    model = build_hf_model(name, seed)
    model.save_pretrained(str(directory), **save_kwargs)
    save_tokenizer(directory)
    return model


REPO = Path(__file__).resolve().parents[1]
SHIPPED_TOKENIZER = REPO / "configs" / "tiny-llama"
SHIPPED_VOCAB = 1536  # configs/tiny-llama/config.json


def save_trainable_model(name: str, directory: Path, seed: int = 0, initializer_range: float = 0.02) -> Path:
    """A tiny model of a family variant with the shipped tokenizer, ready for hg_to_pp + training.
    A larger `initializer_range` makes greedy generation from the random model less repetitive."""
    import copy
    import shutil

    cls, config = VARIANTS[name]
    config = copy.deepcopy(config)
    config.vocab_size = SHIPPED_VOCAB
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 2
    config.initializer_range = initializer_range
    torch.manual_seed(seed)
    cls(config).save_pretrained(str(directory))
    for f in SHIPPED_TOKENIZER.iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            shutil.copyfile(f, directory / f.name)
    return directory
