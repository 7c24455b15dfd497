"""The bloom family: ALiBi position biases, LayerNorm after the embedding, fused
query_key_value, GELU MLP, output embedding tied to the input one.

Pipeline layers: `Embedding` (layer 0: embedding + its LayerNorm), `Block` (1..N),
`FinalNorm` + the tied head (layer N+1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from models.common import FinalNormLayer, LayerIO, ModelConfigError, PipelineBlock, allowed_keys, attention


@dataclass(frozen=True)
class BloomArgs:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    norm_eps: float
    residual_post_norm: bool  # apply_residual_connection_post_layernorm (False in released models)
    hidden_dropout: float
    attention_dropout: float
    tie_embeddings: bool
    initializer_range: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def args_from_hf(config: object) -> BloomArgs:
    if config.hidden_size % config.n_head:
        raise ModelConfigError(f"hidden_size ({config.hidden_size}) must be divisible by n_head ({config.n_head})")
    if not getattr(config, "tie_word_embeddings", True):
        raise ModelConfigError("bloom with tie_word_embeddings=false is not supported: bloom ties its head")
    return BloomArgs(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_layers=config.n_layer,
        num_heads=config.n_head, norm_eps=config.layer_norm_epsilon,
        residual_post_norm=bool(config.apply_residual_connection_post_layernorm),
        hidden_dropout=float(config.hidden_dropout), attention_dropout=float(config.attention_dropout),
        tie_embeddings=True, initializer_range=float(getattr(config, "initializer_range", 0.02)),
    )


@lru_cache(maxsize=8)
def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes [nh]: a geometric sequence for the largest power of two <= nh, then
    every other slope of the next power for the remaining heads (as in the ALiBi paper)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** p for p in range(1, closest + 1)]
    if closest != num_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** p for p in range(1, 1 + 2 * min(closest, num_heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias [B, nh, T, T]: slope * key position where the key may be seen.

    slope * (key - query) is what ALiBi means; the query term is constant along a softmax row,
    so slope * key position gives the same probabilities (and matches transformers exactly).
    """
    bias = slopes.to(position_ids.device)[None, :, None, None] * position_ids[:, None, None, :].float()
    blocked = ~allowed_keys(segment_ids, None)  # [B, 1, T, T]
    bias = bias.masked_fill(blocked, torch.finfo(torch.float32).min)
    return bias.to(dtype)


class Embedding(nn.Module):
    """Layer 0: token ids -> LayerNorm(embedding)."""

    def __init__(self, args: BloomArgs) -> None:
        super().__init__()
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size)
        self.embed_norm = nn.LayerNorm(args.hidden_size, eps=args.norm_eps)

    def forward(self, inputs: LayerIO) -> LayerIO:
        input_ids, position_ids, segment_ids, targets = inputs
        return self.embed_norm(self.embed(input_ids)), position_ids, segment_ids, targets


class Attention(nn.Module):
    def __init__(self, args: BloomArgs) -> None:
        super().__init__()
        self.query_key_value = nn.Linear(args.hidden_size, 3 * args.hidden_size)
        self.dense = nn.Linear(args.hidden_size, args.hidden_size)
        self.num_heads, self.head_dim, self.dropout = args.num_heads, args.head_dim, args.attention_dropout

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # bloom fuses per head: [B, T, nh, (q, k, v), hd]
        qkv = self.query_key_value(x).view(b, t, self.num_heads, 3, self.head_dim)
        q, k, v = (qkv[..., i, :].transpose(1, 2) for i in range(3))  # each [B, nh, T, hd]
        bias = alibi_bias(alibi_slopes(self.num_heads), position_ids, segment_ids, q.dtype)
        out = attention(q, k, v, mask=bias, dropout=self.dropout if self.training else 0.0)
        return self.dense(out)


class MLP(nn.Module):
    def __init__(self, args: BloomArgs) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(args.hidden_size, 4 * args.hidden_size)
        self.dense_4h_to_h = nn.Linear(4 * args.hidden_size, args.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class Block(PipelineBlock):
    def __init__(self, args: BloomArgs, index: int, *, grad_ckpt: bool = False, packed: bool = False) -> None:
        super().__init__()
        del index, packed  # every bloom block is alike; ALiBi masks are built from segment ids
        self.attn_norm = nn.LayerNorm(args.hidden_size, eps=args.norm_eps)
        self.attn = Attention(args)
        self.mlp_norm = nn.LayerNorm(args.hidden_size, eps=args.norm_eps)
        self.mlp = MLP(args)
        self.residual_post_norm, self.dropout = args.residual_post_norm, args.hidden_dropout
        self.grad_ckpt = grad_ckpt

    def block(self, x: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        normed = self.attn_norm(x)
        residual = normed if self.residual_post_norm else x
        x = residual + F.dropout(self.attn(normed, position_ids, segment_ids), self.dropout, self.training)
        normed = self.mlp_norm(x)
        residual = normed if self.residual_post_norm else x
        return residual + F.dropout(self.mlp(normed), self.dropout, self.training)


class FinalNorm(FinalNormLayer):
    def __init__(self, args: BloomArgs) -> None:
        super().__init__(nn.LayerNorm(args.hidden_size, eps=args.norm_eps))


class LMHead(nn.Module):
    """Never built for bloom (its head is the tied embedding); present for the family interface."""

    def __init__(self, args: BloomArgs) -> None:
        raise ModelConfigError("bloom's output layer is tied to its input embedding")


FROM_HF: dict[str, tuple[str, str] | None] = {
    "word_embeddings.weight": ("embed", "embed.weight"),
    "word_embeddings_layernorm.weight": ("embed", "embed_norm.weight"),
    "word_embeddings_layernorm.bias": ("embed", "embed_norm.bias"),
    "h.{}.input_layernorm.weight": ("block", "attn_norm.weight"),
    "h.{}.input_layernorm.bias": ("block", "attn_norm.bias"),
    "h.{}.self_attention.query_key_value.weight": ("block", "attn.query_key_value.weight"),
    "h.{}.self_attention.query_key_value.bias": ("block", "attn.query_key_value.bias"),
    "h.{}.self_attention.dense.weight": ("block", "attn.dense.weight"),
    "h.{}.self_attention.dense.bias": ("block", "attn.dense.bias"),
    "h.{}.post_attention_layernorm.weight": ("block", "mlp_norm.weight"),
    "h.{}.post_attention_layernorm.bias": ("block", "mlp_norm.bias"),
    "h.{}.mlp.dense_h_to_4h.weight": ("block", "mlp.dense_h_to_4h.weight"),
    "h.{}.mlp.dense_h_to_4h.bias": ("block", "mlp.dense_h_to_4h.bias"),
    "h.{}.mlp.dense_4h_to_h.weight": ("block", "mlp.dense_4h_to_h.weight"),
    "h.{}.mlp.dense_4h_to_h.bias": ("block", "mlp.dense_4h_to_h.bias"),
    "ln_f.weight": ("head", "norm.weight"),
    "ln_f.bias": ("head", "norm.bias"),
    # The head is the embedding (tied); checkpoints that store a copy have it dropped on import.
    "lm_head.weight": None,
}
# transformers' BloomForCausalLM prefixes the base model's keys; bigscience's checkpoints do not.
HF_PREFIX = "transformer."


def block_flops_per_token(args: BloomArgs, seq_len: int) -> float:
    h = args.hidden_size
    return 2.0 * (4 * h * h + 8 * h * h) + 2.0 * h * seq_len
