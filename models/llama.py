"""The llama family: llama 1/2/3, mistral, qwen2 — RMSNorm, RoPE, grouped-query attention,
SwiGLU, optional qkv bias, sliding windows, tied or untied embeddings.

Pipeline layers: `Embedding` (layer 0), `Block` (layers 1..N), `FinalNorm` + `LMHead` (layer N+1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.common import (
    FinalNormLayer,
    LayerIO,
    ModelConfigError,
    PipelineBlock,
    RMSNorm,
    RopeSpec,
    allowed_keys,
    apply_rope,
    attention,
    rope_cos_sin,
    rope_from_hf,
    select_trained,
)

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu,
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass(frozen=True)
class LlamaArgs:
    """Everything the llama-family layers need, read once from the HF config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    rope: RopeSpec
    act: str
    qkv_bias: bool  # qwen2: bias on q/k/v only; llama's attention_bias: on q/k/v/o
    o_bias: bool
    mlp_bias: bool
    tie_embeddings: bool
    pad_token_id: int | None  # HF builds the embedding with this padding_idx (no gradient there)
    windows: tuple[int | None, ...]  # sliding window per block, None = full attention
    attention_dropout: float
    initializer_range: float


def args_from_hf(config: object) -> LlamaArgs:
    """Read a LlamaConfig / MistralConfig / Qwen2Config."""
    model_type = getattr(config, "model_type")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads % kv_heads:
        raise ModelConfigError(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
    act = getattr(config, "hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ModelConfigError(f"hidden_act {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    bias = bool(getattr(config, "attention_bias", False))
    qkv_bias = model_type == "qwen2" or bias
    return LlamaArgs(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_layers=config.num_hidden_layers,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, norm_eps=config.rms_norm_eps,
        rope=rope_from_hf(config, head_dim), act=act, qkv_bias=qkv_bias,
        o_bias=bias and model_type != "qwen2", mlp_bias=bool(getattr(config, "mlp_bias", False)),
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        pad_token_id=getattr(config, "pad_token_id", None), windows=_windows(config),
        attention_dropout=float(getattr(config, "attention_dropout", 0.0) or 0.0),
        initializer_range=float(getattr(config, "initializer_range", 0.02)),
    )


def _windows(config: object) -> tuple[int | None, ...]:
    """Per-block sliding window: qwen2 lists `layer_types`; mistral slides every layer."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        return (None,) * n
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return (window,) * n


class Embedding(nn.Module):
    """Layer 0: token ids -> hidden states."""

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size, padding_idx=args.pad_token_id)

    def forward(self, inputs: LayerIO) -> LayerIO:
        input_ids, position_ids, segment_ids, targets = inputs
        return self.embed(input_ids), position_ids, segment_ids, targets


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs, window: int | None, packed: bool) -> None:
        super().__init__()
        h, hd = args.hidden_size, args.head_dim
        self.q_proj = nn.Linear(h, args.num_heads * hd, bias=args.qkv_bias)
        self.k_proj = nn.Linear(h, args.num_kv_heads * hd, bias=args.qkv_bias)
        self.v_proj = nn.Linear(h, args.num_kv_heads * hd, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.num_heads * hd, h, bias=args.o_bias)
        self.rope, self.window, self.packed = args.rope, window, packed
        self.head_dim, self.dropout = hd, args.attention_dropout

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # [B, nh, T, hd]
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # [B, nkv, T, hd]
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        cos, sin = rope_cos_sin(self.rope, position_ids, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        windowed = self.window is not None and t > self.window
        # Right-padded rows need no mask: padding comes after every real token.
        mask = allowed_keys(segment_ids, self.window) if (self.packed or windowed) else None
        out = attention(q, k, v, mask=mask, dropout=self.dropout if self.training else 0.0)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        h, i = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=args.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=args.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=args.mlp_bias)
        self.act = ACTIVATIONS[args.act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(PipelineBlock):
    """A pre-norm decoder block; with `grad_ckpt` its activations are recomputed in backward."""

    def __init__(self, args: LlamaArgs, index: int, *, grad_ckpt: bool = False, packed: bool = False) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(args.hidden_size, args.norm_eps)
        self.attn = Attention(args, args.windows[index], packed)
        self.mlp_norm = RMSNorm(args.hidden_size, args.norm_eps)
        self.mlp = MLP(args)
        self.grad_ckpt = grad_ckpt

    def block(self, x: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), position_ids, segment_ids)
        return x + self.mlp(self.mlp_norm(x))


class FinalNorm(FinalNormLayer):
    """First half of layer N+1."""

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__(RMSNorm(args.hidden_size, args.norm_eps))


class LMHead(nn.Module):
    """Second half of layer N+1 when the output embedding is not tied to the input one."""

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def forward(self, inputs: LayerIO) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, _, _, targets = inputs
        hidden, targets = select_trained(hidden, targets)
        return self.project(hidden), targets  # [n, V], [n]


# HF parameter name -> (pipeline layer kind, name inside that layer's file); "{}" is the block
# index. Used in both conversion directions (the reverse is derived). None: dropped on purpose.
FROM_HF: dict[str, tuple[str, str] | None] = {
    "model.embed_tokens.weight": ("embed", "embed.weight"),
    "model.layers.{}.input_layernorm.weight": ("block", "attn_norm.weight"),
    "model.layers.{}.self_attn.q_proj.weight": ("block", "attn.q_proj.weight"),
    "model.layers.{}.self_attn.q_proj.bias": ("block", "attn.q_proj.bias"),
    "model.layers.{}.self_attn.k_proj.weight": ("block", "attn.k_proj.weight"),
    "model.layers.{}.self_attn.k_proj.bias": ("block", "attn.k_proj.bias"),
    "model.layers.{}.self_attn.v_proj.weight": ("block", "attn.v_proj.weight"),
    "model.layers.{}.self_attn.v_proj.bias": ("block", "attn.v_proj.bias"),
    "model.layers.{}.self_attn.o_proj.weight": ("block", "attn.o_proj.weight"),
    "model.layers.{}.self_attn.o_proj.bias": ("block", "attn.o_proj.bias"),
    "model.layers.{}.post_attention_layernorm.weight": ("block", "mlp_norm.weight"),
    "model.layers.{}.mlp.gate_proj.weight": ("block", "mlp.gate_proj.weight"),
    "model.layers.{}.mlp.gate_proj.bias": ("block", "mlp.gate_proj.bias"),
    "model.layers.{}.mlp.up_proj.weight": ("block", "mlp.up_proj.weight"),
    "model.layers.{}.mlp.up_proj.bias": ("block", "mlp.up_proj.bias"),
    "model.layers.{}.mlp.down_proj.weight": ("block", "mlp.down_proj.weight"),
    "model.layers.{}.mlp.down_proj.bias": ("block", "mlp.down_proj.bias"),
    "model.norm.weight": ("head", "norm.weight"),
    "lm_head.weight": ("head", "lm_head.weight"),
    # Older checkpoints stored the rotary frequencies; they are recomputed from the config.
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,
}


def block_flops_per_token(args: LlamaArgs, seq_len: int) -> float:
    """Forward FLOPs per token of one block: 2 per weight + causal attention scores and mix."""
    h, hd = args.hidden_size, args.head_dim
    weights = h * hd * (2 * args.num_heads + 2 * args.num_kv_heads) + 3 * h * args.intermediate_size
    return 2.0 * weights + 2.0 * args.num_heads * hd * seq_len  # 4*T*nh*hd halved by causality
