"""What each pipeline layer costs: parameters (counted exactly from the modules the pipeline
builds) and activation bytes per token (counted from the tensors autograd saves in our own layer
code, see docs/plan.md).

Shapes: H hidden, nh query heads, hd head dim, I MLP width, V vocabulary, L sequence length.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig

from models.bloom import BloomArgs
from models.common import ModelConfigError
from models.llama import LlamaArgs
from models.pipedir import expected_params
from models.registry import SUPPORTED_MODEL_TYPES
from models.spec import ModelSpec, layer_costs, spec_from_config

FP32 = 4
INT64 = 8
# Every stage's input tuple carries position_ids, segment_ids and targets (int64) besides hidden.
ROW_INTS = 3 * INT64
# Logits bytes per trained position and vocabulary entry: the fp16/bf16 logits the last stage
# keeps as its output (2), the fp32 log-softmax cross_entropy saves (4), and in backward the
# fp32 gradients of the log-probabilities and of the fp32 logits (4 + 4).
LOGITS_BYTES = 2 + FP32 + FP32 + FP32


@dataclass(frozen=True)
class LayerProfile:
    """One pipeline layer as the planner sees it."""

    index: int
    kind: str  # "embed" | "block" | "head"
    params: int  # parameters this layer owns (a tied head owns none; see tied_copy_params)
    largest_param: int  # elements of its largest tensor (ZeRO offload's staging buffer)
    act_per_token: int  # bytes kept for backward per token (not counting the layer's input tensor)
    keeps_input: bool  # its first op saves the layer's input tensor (LayerNorm does, our RMSNorm does not)
    compute: float  # relative compute (models.spec.layer_costs), for balancing


@dataclass(frozen=True)
class ModelProfile:
    spec: ModelSpec
    layers: list[LayerProfile]
    tied_copy_params: int  # the last stage's copy of a tied embedding (DeepSpeed TiedLayerSpec)
    hidden_size: int
    vocab_size: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def at_seq_len(self, seq_len: int) -> ModelProfile:
        """The same model at another sequence length (parameters are not recounted)."""
        return model_profile(self.spec, seq_len=seq_len, params=[(x.params, x.largest_param) for x in self.layers])

    @property
    def total_params(self) -> int:
        """Unique parameters (what transformers counts); the tied copy is not counted twice."""
        return sum(layer.params for layer in self.layers)


def load_model_spec(path: str | Path) -> ModelSpec:
    """An HF model dir, a pipeline dir, a dir with only config.json, or a config.json file."""
    path = Path(path)
    config_file = path / "config.json" if path.is_dir() else path
    if not path.exists():
        raise ModelConfigError(f"--model {path} does not exist; give an HF model dir, a pipeline dir from "
                               f"`convert_model.py hg_to_pp`, or a config.json file (no Hub download here)")
    if not config_file.is_file():
        raise ModelConfigError(f"--model {path} has no config.json; give an HF model dir, a pipeline dir, "
                               f"or the path of a config.json")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelConfigError(f"{config_file} is not valid JSON ({err}); give the model's config.json") from err
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelConfigError(f"{config_file}: model_type {model_type!r} is not supported; supported model "
                               f"types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    try:
        config = AutoConfig.from_pretrained(str(config_file))
    except (ValueError, OSError) as err:
        raise ModelConfigError(f"{config_file} cannot be read by transformers: {err}") from err
    return spec_from_config(config)


def layer_params(spec: ModelSpec) -> list[tuple[int, int]]:
    """(parameters, elements of the largest tensor) per pipeline layer, from the modules the
    pipeline builds (on the meta device: no memory). The tied head owns nothing."""
    out = []
    for named in expected_params(spec):
        sizes = [math.prod(shape) for shape, _ in named.values()]
        out.append((sum(sizes), max(sizes, default=0)))
    return out


def model_profile(spec: ModelSpec, *, seq_len: int, params: list[tuple[int, int]] | None = None,
                  dtype_bytes: int = 2) -> ModelProfile:
    """Per-layer parameters and activations; pass `params` (layer_params) to skip rebuilding."""
    params = params if params is not None else layer_params(spec)
    costs = layer_costs(spec, seq_len=seq_len, grad_ckpt=False)
    acts = _activations(spec, seq_len=seq_len, e=dtype_bytes)
    layers = []
    for index, (count, largest) in enumerate(params):
        kind = "embed" if index == 0 else "head" if index == spec.num_layers - 1 else "block"
        act = acts.embed if kind == "embed" else acts.head if kind == "head" else acts.blocks[index - 1]
        layers.append(LayerProfile(index=index, kind=kind, params=count, largest_param=largest,
                                   act_per_token=act.per_token, keeps_input=act.keeps_input, compute=costs[index]))
    tied = layers[0].params if spec.tied else 0
    return ModelProfile(spec=spec, layers=layers, tied_copy_params=tied, hidden_size=spec.args.hidden_size,
                        vocab_size=spec.args.vocab_size)


@dataclass(frozen=True)
class LayerActs:
    per_token: int  # bytes kept for backward per token, not counting the layer's input
    keeps_input: bool


@dataclass(frozen=True)
class FamilyActs:
    embed: LayerActs
    blocks: list[LayerActs]
    head: LayerActs


def _activations(spec: ModelSpec, *, seq_len: int, e: int) -> FamilyActs:
    if isinstance(spec.args, LlamaArgs):
        return _llama_activations(spec.args, seq_len, e)
    if isinstance(spec.args, BloomArgs):
        return _bloom_activations(spec.args, seq_len, e)
    raise ModelConfigError(f"no activation model for family {spec.family.name!r}; add one to planner/profile.py")


def _head_saved(h: int, v: int, e: int) -> int:
    """Trained rows of the hidden state (saved by the head's matmul), the boolean row mask the
    selection saves (1 byte), the selected targets (int64, kept by the loss) and the logits."""
    return e * h + 1 + INT64 + LOGITS_BYTES * v


def _llama_activations(args: LlamaArgs, seq_len: int, e: int) -> FamilyActs:
    """Per token, as autograd saves them in models/llama.py + models/common.py (SDPA without an
    attention matrix; k/v are saved after GQA's repeat_interleave, i.e. at nh heads)."""
    h, nh, hd, inter = args.hidden_size, args.num_heads, args.head_dim, args.intermediate_size
    rms = FP32 * h + e * h + FP32  # fp32 copy (pow/mul), the cast normalised x (weight mul), rsqrt
    norm_out = e * h  # the norm's output, saved by the projections that read it
    attention = 4 * e * nh * hd + FP32 * nh + 2 * e * hd  # q, k, v, out; logsumexp; rope cos, sin
    mlp = 4 * e * inter  # gate out, silu out, up out, product
    block = 2 * (rms + norm_out) + attention + mlp
    # A sliding window shorter than the sequence needs an explicit mask: SDPA keeps an additive
    # [B, 1, L, L] mask in the training dtype (e * L per token).
    blocks = [LayerActs(block + (e * seq_len if w is not None and seq_len > w else 0), False) for w in args.windows]
    return FamilyActs(embed=LayerActs(0, False), blocks=blocks,
                      head=LayerActs(rms + _head_saved(h, args.vocab_size, e), False))


def _bloom_activations(args: BloomArgs, seq_len: int, e: int) -> FamilyActs:
    """Per token, as autograd saves them in models/bloom.py: LayerNorm keeps its input and fp32
    mean/rstd; ALiBi's additive [B, nh, L, L] bias is kept by SDPA for backward."""
    h, nh = args.hidden_size, args.num_heads
    stats = 2 * FP32
    # ln1 stats + out, fused qkv (3h), alibi bias, attention out, logsumexp, ln2 in + stats + out,
    # h->4h out, gelu out (the block input itself is kept by ln1: keeps_input)
    block = stats + e * h + 3 * e * h + e * nh * seq_len + e * h + FP32 * nh + e * h + stats + e * h + 8 * e * h
    embed = e * h + stats  # the looked-up rows, kept by the embedding LayerNorm
    return FamilyActs(embed=LayerActs(embed, False), blocks=[LayerActs(block, True)] * args.num_layers,
                      head=LayerActs(stats + _head_saved(h, args.vocab_size, e), True))
