"""GPU (and, with offload, host) memory of one pipeline stage; every term is explained in
docs/plan.md with the DeepSpeed source it comes from.

A stage's peak is  overhead + weights + grads + optimizer + max(activations, buffers + step):
activations peak during the pipeline's forward/backward passes and are all freed before the
gradient reduction and optimizer step, whose temporary buffers (`step`) peak afterwards.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from planner.profile import INT64, ROW_INTS, ModelProfile

GIB = 2**30
HALF = 2  # bytes per fp16 / bf16 element
OPTIMIZERS = ("adamw", "lion")
DTYPES = ("fp16", "bf16")
STATE_BYTES = {"adamw": 8, "lion": 4}  # fp32 exp_avg + exp_avg_sq (AdamW), exp_avg (Lion)
# deepspeed/runtime/engine.py MEMORY_OPT_ALLREDUCE_SIZE: elements per flattened all-reduce bucket.
DS_ALLREDUCE_BUCKET = 500_000_000
# deepspeed/runtime/zero/config.py reduce_bucket_size default; ZeRO-1 under a pipeline allocates
# one such bucket (stage_1_and_2.py reduce_gradients) while it reduces gradients.
DS_REDUCE_BUCKET = 500_000_000


class PlanError(ValueError):
    """Options that cannot describe a training run; the message says which and how to fix it."""


@dataclass(frozen=True)
class PlanOptions:
    """A training setup to plan for (the flags of plan.py)."""

    seq_len: int
    """Tokens per row (max_seq_len)."""
    gpu_mem_gib: float
    """Memory of one GPU in GiB, as nvidia-smi reports it (MiB / 1024)."""
    micro_batch: int = 1
    """Rows per micro-batch (train_micro_batch_size_per_gpu)."""
    grad_ckpt: bool = False
    """use_grad_ckpt: each block keeps only its input; one block is recomputed at a time."""
    optimizer: str = "adamw"
    """adamw (DeepSpeed's fused Adam on GPU) or lion (lion-pytorch)."""
    dtype: str = "fp16"
    """fp16 or bf16 training (the weights' dtype)."""
    zero: int = 0
    """ZeRO stage: 0 or 1 (the pipeline allows no more)."""
    offload: bool = False
    """ZeRO-1 with the optimizer (fp32 master weights, states) in host memory; implies zero=1."""
    overhead_gib: float = 2.0
    """Per GPU: CUDA context, NCCL buffers, allocator fragmentation."""
    grad_accum: int | None = None
    """Micro-batches per step; None: at least the pipeline depth (every stage's 1F1B peak is reached)."""
    gpus_per_node: int = 8
    """For the host-memory total per node with offload."""

    def __post_init__(self) -> None:
        for name in ("seq_len", "micro_batch", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise PlanError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.grad_accum is not None and self.grad_accum < 1:
            raise PlanError(f"--grad-accum must be at least 1, got {self.grad_accum}")
        if not self.gpu_mem_gib > 0:
            raise PlanError(f"--gpu-mem must be positive (GiB per GPU, e.g. 32 for a V100-32GB), "
                            f"got {self.gpu_mem_gib}")
        if self.overhead_gib < 0:
            raise PlanError(f"--overhead must be >= 0 GiB, got {self.overhead_gib}")
        if self.optimizer not in OPTIMIZERS:
            raise PlanError(f"--optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.dtype not in DTYPES:
            raise PlanError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.zero not in (0, 1):
            raise PlanError(f"--zero {self.zero}: pipeline parallelism allows ZeRO stage 0 or 1 only")
        if self.offload and self.zero != 1:
            raise PlanError("--offload is ZeRO-1's CPU optimizer offload; give --zero 1 with it (or leave --zero out)")

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


@dataclass(frozen=True)
class OptimizerPath:
    """What DeepSpeed keeps per parameter for one (dtype, ZeRO, optimizer, offload) choice."""

    name: str
    grad_bytes: int  # GPU, every parameter of the stage
    state_bytes: int  # GPU: fp32 master + optimizer states
    step_bytes: int  # GPU, only during the step: fp32 gradient copies
    cpu_bytes: int  # host (offload)
    partitioned: bool  # state, step and cpu bytes are divided over the data-parallel replicas
    zero_bucket: bool  # ZeRO-1's fixed reduce bucket instead of the engine's all-reduce buckets


def optimizer_path(opt: PlanOptions) -> OptimizerPath:
    """Read off DeepSpeed 0.19 (runtime/engine.py _do_optimizer_sanity_check picks the wrapper)."""
    states = STATE_BYTES[opt.optimizer]
    if opt.offload:  # stage_1_and_2.py: fp32 master, fp32 grad partition, states, fp16 staging copy on host
        return OptimizerPath("DeepSpeedZeroOptimizer, stage 1, CPU offload", 2, 0, 0, 4 + 4 + states + 2, True, True)
    if opt.zero == 1:  # fp32 master + states of this rank's partition; step: flat fp16 + fp32 grad partition
        return OptimizerPath("DeepSpeedZeroOptimizer, stage 1", 2, 4 + states, 2 + 4, 0, True, True)
    if opt.dtype == "bf16":  # pipeline + bf16 -> BF16_Optimizer: bf16 grad-accumulation buffer, sharded master
        return OptimizerPath("BF16_Optimizer", 2 + 2, 4 + states, 4, 0, True, False)
    if opt.optimizer == "adamw":  # FusedAdam -> FP16_Optimizer: flat fp32 master; step flattens fp32 grads
        return OptimizerPath("FP16_Optimizer (fused Adam)", 2, 4 + states, 4 + 4, 0, False, False)
    # a client optimizer (Lion) -> FP16_UnfusedOptimizer: per-tensor fp32 master and fp32 grads
    return OptimizerPath("FP16_UnfusedOptimizer", 2, 4 + states, 4, 0, False, False)


@dataclass(frozen=True)
class StageMemory:
    """One stage's memory in bytes (cpu: host bytes per rank, with offload)."""

    stage: int
    first_layer: int
    last_layer: int
    label: str
    params: int
    weights: int
    grads: int
    optimizer: int
    activations: int  # 1F1B peak: in-flight micro-batches, recompute, logits, pipe buffers
    buffers: int  # part of activations that stays through the step (p2p receive buffers)
    step: int  # temporaries of the gradient reduction and the optimizer step
    overhead: int
    cpu: int

    @property
    def total(self) -> int:
        peak_phase = max(self.activations, self.buffers + self.step)
        return self.overhead + self.weights + self.grads + self.optimizer + peak_phase

    def as_dict(self, gpu_mem: int) -> dict:
        return {**asdict(self), "total": self.total, "fits": self.total <= gpu_mem}


def stage_label(first: int, last: int, num_layers: int) -> str:
    """'emb+3 blocks', '4 blocks', '2 blocks+head'."""
    blocks = max(0, min(last, num_layers - 2) - max(first, 1) + 1)
    parts = (["emb"] if first == 0 else []) + ([f"{blocks} block{'s' * (blocks != 1)}"] if blocks else [])
    return "+".join(parts + (["head"] if last == num_layers - 1 else []))


class StageModel:
    """Memory of any contiguous layer range on any stage in O(1), from prefix sums."""

    def __init__(self, profile: ModelProfile, opt: PlanOptions) -> None:
        self.profile, self.opt, self.path = profile, opt, optimizer_path(opt)
        self.e = HALF
        self.n = profile.num_layers
        layers = profile.layers
        self._params = _prefix([lay.params for lay in layers])
        held = [lay.act_per_token if not (opt.grad_ckpt and lay.kind == "block") else 0 for lay in layers]
        self._acts = _prefix(held)
        # a layer whose input tensor stays alive: LayerNorm keeps it, a checkpointed block keeps it
        self._keeps = _prefix([int(lay.keeps_input or (opt.grad_ckpt and lay.kind == "block")) for lay in layers])
        blocks = [lay.act_per_token if lay.kind == "block" else 0 for lay in layers]
        self._block_max = _range_max(blocks)
        self._largest = _range_max([lay.largest_param for lay in layers])
        self._overhead = int(opt.overhead_gib * GIB)

    def params(self, a: int, b: int, *, last: bool, pipe: int) -> int:
        tied = self.profile.tied_copy_params if last and pipe > 1 else 0
        return self._params[b] - self._params[a] + tied

    def activations(self, s: int, a: int, b: int, pipe: int) -> tuple[int, int]:
        """(activations at the 1F1B peak, the p2p buffers among them), bytes."""
        opt, e, h = self.opt, self.e, self.profile.hidden_size
        first, last = s == 0, s == pipe - 1
        in_flight = pipe - s if opt.grad_accum is None else min(pipe - s, opt.grad_accum)
        boundaries = (not first) + (not last) + (self._keeps[b] - self._keeps[a + 1] if b > a + 1 else 0)
        per_token = self._acts[b] - self._acts[a] + boundaries * e * h + ROW_INTS + (INT64 if first else 0)
        recompute = self._block_max[a][b - 1] if opt.grad_ckpt else 0
        buffers = ((0 if first else e * h + ROW_INTS) + (0 if last else e * h)) * opt.tokens
        return (in_flight * per_token + recompute) * opt.tokens + buffers, buffers

    def stage(self, s: int, a: int, b: int, *, pipe: int, data: int) -> StageMemory:
        """Stage s of `pipe` holding layers a..b-1, with `data` replicas of the pipeline."""
        params, *terms = self._terms(s, a, b, pipe=pipe, data=data)
        weights, grads, optimizer, acts, buffers, step, cpu = terms
        return StageMemory(stage=s, first_layer=a, last_layer=b - 1, label=stage_label(a, b - 1, self.n),
                           params=params, weights=weights, grads=grads, optimizer=optimizer, activations=acts,
                           buffers=buffers, step=step, overhead=self._overhead, cpu=cpu)

    def total(self, s: int, a: int, b: int, *, pipe: int, data: int) -> int:
        """StageMemory.total without building the record (the searches call this a lot)."""
        _, weights, grads, optimizer, acts, buffers, step, _ = self._terms(s, a, b, pipe=pipe, data=data)
        return self._overhead + weights + grads + optimizer + max(acts, buffers + step)

    def _terms(self, s: int, a: int, b: int, *, pipe: int, data: int) -> tuple[int, ...]:
        path, last = self.path, s == pipe - 1
        params = self.params(a, b, last=last, pipe=pipe)
        share = data if path.partitioned else 1
        largest = self._largest[a][b - 1]
        if last and pipe > 1 and self.profile.tied_copy_params:
            largest = max(largest, self.profile.layers[0].largest_param)
        staging = self.e * largest if self.opt.offload else 0  # offload: grad staging buffer, GPU and host
        acts, buffers = self.activations(s, a, b, pipe)
        # a bucket closes after the tensor that takes it past the limit
        bucket = self.e * (DS_REDUCE_BUCKET if path.zero_bucket else min(params, DS_ALLREDUCE_BUCKET + largest))
        step = max(_ceil(path.step_bytes * params, share), bucket)
        return (params, self.e * params, path.grad_bytes * params + staging, _ceil(path.state_bytes * params, share),
                acts, buffers, step, _ceil(path.cpu_bytes * params, share) + staging)


def _ceil(value: int, divisor: int) -> int:
    return -(-value // divisor)


def _prefix(values: list[int]) -> list[int]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out


def _range_max(values: list[int]) -> list[list[int]]:
    """table[a][b] = max(values[a..b]) for a <= b (n is at most a few hundred layers)."""
    table = []
    for a in range(len(values)):
        row, best = [0] * len(values), 0
        for b in range(a, len(values)):
            best = max(best, values[b])
            row[b] = best
        table.append(row)
    return table
