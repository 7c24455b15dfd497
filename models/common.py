"""Pieces shared by the model families: norms, rotary embeddings, attention masks, the loss.

Shapes in comments: B batch, T sequence, H hidden, nh heads, nkv key/value heads, hd head dim,
V vocabulary, n trained positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from data.masking import IGNORE_INDEX  # noqa: F401  (the one definition; re-exported for the layers)

# (hidden, position_ids, segment_ids, targets): what every pipeline layer takes and returns;
# only `hidden` is floating point, so only it carries gradients between pipeline stages.
LayerIO = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class ModelConfigError(ValueError):
    """A model configuration this toolkit cannot build; the message names the key and the fix."""


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as llama does (weight applied in input dtype)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


# ---------------------------------------------------------------------------------------------
# Rotary position embeddings


ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeSpec:
    """RoPE frequencies; `kind` follows transformers' rope_type names."""

    theta: float
    head_dim: int
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192


def rope_from_hf(config: object, head_dim: int) -> RopeSpec:
    """Read `rope_parameters` (transformers >= 5) or the older `rope_theta` + `rope_scaling`."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ModelConfigError(
            f"rope_type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)}); "
            f"train with a checkpoint that uses one of these, or add the type to models/common.py")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelConfigError("partial_rotary_factor != 1.0 is not supported by the llama family here")
    return RopeSpec(
        theta=float(params.get("rope_theta", 10000.0)),
        head_dim=head_dim,
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_positions=int(params.get("original_max_position_embeddings", 8192)),
    )


@lru_cache(maxsize=16)
def _inv_freq_cpu(spec: RopeSpec) -> torch.Tensor:
    """Inverse frequencies [hd/2] in float32; cached per spec, computed on the CPU once."""
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if spec.kind == "linear":
        return inv_freq / spec.factor
    if spec.kind == "llama3":
        return _llama3_scale(inv_freq, spec)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Llama 3.1's scaling: keep high frequencies, divide low ones by `factor`, blend between."""
    low_wavelen = spec.original_max_positions / spec.low_freq_factor
    high_wavelen = spec.original_max_positions / spec.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / spec.factor, inv_freq)
    smooth = (spec.original_max_positions / wavelen - spec.low_freq_factor) / (
        spec.high_freq_factor - spec.low_freq_factor)
    smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


@lru_cache(maxsize=16)
def _inv_freq_on(spec: RopeSpec, device: torch.device) -> torch.Tensor:
    """The inverse frequencies on `device`, copied there once. A copy per call would be a
    blocking host-to-device copy in every block's forward (and recompute): on a GPU each one
    synchronises the stream, so the CPU could never queue kernels ahead of the GPU."""
    return _inv_freq_cpu(spec).to(device)


def rope_cos_sin(spec: RopeSpec, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, T, hd] for the given positions (computed in float32, then cast)."""
    inv_freq = _inv_freq_on(spec, position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq  # [B, T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, T, hd] by the position angles (the rotate-half convention of HF)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# ---------------------------------------------------------------------------------------------
# Attention


def allowed_keys(segment_ids: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean [B, 1, T, T]: query t may attend key s when s <= t, both belong to the same sample
    (segment) and, with a sliding window, t - s < window."""
    t = segment_ids.shape[-1]
    idx = torch.arange(t, device=segment_ids.device)
    ok = idx[None, :] <= idx[:, None]  # [T, T] causal
    if window is not None:
        ok = ok & (idx[:, None] - idx[None, :] < window)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, T]
    return (same & ok)[:, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None,
              dropout: float) -> torch.Tensor:
    """SDPA over q [B, nh, T, hd], k/v [B, nkv, T, hd] -> [B, T, nh*hd].

    `mask` None means plain causal attention (SDPA's flash path on GPU); otherwise a boolean
    "may attend" mask or an additive float bias, broadcastable to [B, nh, T, T].
    """
    if k.shape[1] != q.shape[1]:  # grouped-query attention: share each kv head across a group
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout)
    b, nh, t, hd = out.shape
    return out.transpose(1, 2).reshape(b, t, nh * hd)


# ---------------------------------------------------------------------------------------------
# Layer bases


class PipelineBlock(nn.Module):
    """A decoder block as a pipeline layer: takes and returns the pipeline tuple; with
    `grad_ckpt` its activations are recomputed in backward (torch's non-reentrant checkpoint,
    which also replays dropout's RNG)."""

    grad_ckpt: bool = False

    def block(self, x: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, inputs: LayerIO) -> LayerIO:
        x, position_ids, segment_ids, targets = inputs
        if self.grad_ckpt and torch.is_grad_enabled():
            x = checkpoint(self.block, x, position_ids, segment_ids, use_reentrant=False)
        else:
            x = self.block(x, position_ids, segment_ids)
        return x, position_ids, segment_ids, targets


class FinalNormLayer(nn.Module):
    """The first module of the last pipeline layer: the final norm (the head follows)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, inputs: LayerIO) -> LayerIO:
        x, position_ids, segment_ids, targets = inputs
        return self.norm(x), position_ids, segment_ids, targets


# ---------------------------------------------------------------------------------------------
# Head and loss


def select_trained(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep only positions with a trained target: hidden [B, T, H] -> [n, H], targets -> [n].

    The head then projects n rows instead of B*T, so the full [B, T, V] logits never exist in
    training (prompt and padding positions are usually most of an instruction batch).
    """
    keep = targets != IGNORE_INDEX
    return hidden[keep], targets[keep]


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of cross entropy of logits [n, V] against targets [n] (IGNORE_INDEX skipped), computed
    in float32: F.cross_entropy(logits.float(), targets, reduction="sum").

    That one-liner keeps a float32 log-softmax [n, V] for backward (beside a float32 copy of
    bf16/fp16 logits), then makes a float32 gradient [n, V] and casts it: up to three float32
    copies of the full-vocab logits at once. Above CE_CHUNK_ELEMENTS logits the same loss is
    computed a row chunk at a time: float32 exists for one chunk only, backward recomputes the
    chunk's softmax and writes the gradient in the logits' dtype: less memory, and faster once
    the logits outgrow the caches (docs/benchmarks.md). Small logits stay on the fused
    one-liner, which is faster while everything fits in cache."""
    if logits.numel() <= CE_CHUNK_ELEMENTS:
        return F.cross_entropy(logits.float(), targets, reduction="sum")
    return _ChunkedCrossEntropy.apply(logits, targets)


CE_CHUNK_ELEMENTS = 1 << 22  # 16 MiB of float32 logits: the one-liner below this, chunks of this above


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows = max(1, CE_CHUNK_ELEMENTS // max(logits.shape[-1], 1))
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for s in range(0, logits.shape[0], rows):
            total += F.cross_entropy(logits[s:s + rows].float(), targets[s:s + rows], reduction="sum")
        ctx.save_for_backward(logits, targets)
        return total

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, targets = ctx.saved_tensors
        rows = max(1, CE_CHUNK_ELEMENTS // max(logits.shape[-1], 1))
        out = torch.empty_like(logits)
        for s in range(0, logits.shape[0], rows):
            t = targets[s:s + rows, None]
            keep = t != IGNORE_INDEX
            p = torch.softmax(logits[s:s + rows].float(), dim=-1)  # d(loss)/d(logits) = softmax - onehot
            p.scatter_add_(1, t.clamp(min=0), -keep.float())
            out[s:s + rows] = p.mul_(grad * keep)
        return out, None


def pipeline_loss(outputs: tuple[torch.Tensor, torch.Tensor], labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """DeepSpeed pipeline loss: summed token loss times the micro-batch's `scale` (labels[0]).

    The loader sets scale = GAS * DP / (trained tokens in the global batch), so that after
    DeepSpeed divides by the gradient-accumulation steps and averages over data-parallel ranks,
    the gradient is that of the mean loss over every trained token of the global batch.
    """
    logits, targets = outputs
    return token_loss_sum(logits, targets) * labels[0].to(logits.device).float().reshape(())


# ---------------------------------------------------------------------------------------------
# Initialisation


@torch.no_grad()
def init_hf_style_(module: nn.Module, *, std: float, generator: torch.Generator) -> None:
    """In-place init as transformers does for these families: normal(0, std) for linear and
    embedding weights, zero biases, unit norm weights. Drawn on the CPU from `generator` so the
    values do not depend on the device or on which stage builds the layer."""
    for name, param in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        if isinstance(owner, (RMSNorm, nn.LayerNorm)):
            value = torch.ones(param.shape) if leaf == "weight" else torch.zeros(param.shape)
        elif leaf == "bias":
            value = torch.zeros(param.shape)
        else:
            value = torch.empty(param.shape).normal_(0.0, std, generator=generator)
            padding_idx = getattr(owner, "padding_idx", None)
            if isinstance(owner, nn.Embedding) and padding_idx is not None:
                value[padding_idx] = 0.0
        param.copy_(value.to(param.dtype))
