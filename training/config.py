"""The training config: one JSON document, the toolkit's keys beside DeepSpeed's own.

The toolkit's keys are parsed into typed dataclasses and validated before any heavy work;
DeepSpeed's keys are kept untouched in `ds` (what we derive — total steps for a scheduler, the
Lion switch-over — goes into a copy built by `deepspeed_config`, never into the user's dict).
"""

from __future__ import annotations

import difflib
import importlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Keys that DeepSpeed reads but declares outside the constants modules harvested below.
_DS_EXTRA_KEYS = {"tensorboard", "csv_monitor", "wandb", "comet", "pipeline", "amp", "elasticity", "compile",
                  "timers", "sparse_gradients", "zero_optimization", "optimizer", "scheduler", "fp16", "bf16"}
_DS_CONSTANT_MODULES = ("deepspeed.runtime.constants", "deepspeed.runtime.zero.config", "deepspeed.monitor.config",
                        "deepspeed.runtime.config", "deepspeed.profiling.constants",
                        "deepspeed.runtime.activation_checkpointing.config", "deepspeed.runtime.swap_tensor.constants",
                        "deepspeed.autotuning.constants", "deepspeed.runtime.data_pipeline.constants",
                        "deepspeed.runtime.precision_config", "deepspeed.comm.constants")
DS_SCHEDULERS_NEEDING_TOTAL = {"WarmupDecayLR", "WarmupCosineLR", "OneCycle"}


class ConfigError(ValueError):
    """A wrong config value; the message names the key, what was given and what is expected."""


def deepspeed_keys() -> set[str]:
    """DeepSpeed's top-level config keys, read from its own constants (so they follow its version)."""
    keys = set(_DS_EXTRA_KEYS)
    for name in _DS_CONSTANT_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        keys.update(v for k, v in vars(module).items()
                    if k.isupper() and isinstance(v, str) and re.fullmatch(r"[a-z][a-z0-9_]*", v))
    return keys


@dataclass(frozen=True)
class Topology:
    """`model_topo`: how ranks are laid out and how layers are split over pipeline stages."""

    pipe: int
    """Pipeline stages (process_topology dims for axis "pipe")."""
    data: int
    """Data-parallel replicas (dims for axis "data"); pipe x data = world size."""
    parts: list[int] | str = "auto"
    """Layers per stage (P numbers summing to blocks + 2), or "auto": balanced by compute."""
    axes: tuple[str, str] = ("pipe", "data")
    """Axis order of the rank grid: with ("pipe", "data") consecutive ranks are data-parallel
    replicas of one stage (DeepSpeed's PipeDataParallelTopology)."""


@dataclass(frozen=True)
class TrainConfig:
    """The toolkit's keys. Every field below is a JSON key of the config file."""

    model_path: Path
    """A pipeline dir from `convert_model.py hg_to_pp` (or, with from_scratch, any dir with config.json + tokenizer)."""
    data_path: Any
    """A sample file, a folder, or a list of them ({"path": ..., "weight": w} entries weight a source)."""
    save_path: Path
    """Checkpoints (checkpoints/), exported weights (weights/step_N/), metrics.jsonl and the data cache."""
    max_seq_len: int
    """Tokens per row after truncation."""
    topology: Topology
    """From `model_topo`."""
    n_epochs: int = 1
    """Passes over the data."""
    from_scratch: bool = False
    """Random init from config.json in model_path instead of loading weights."""
    eval_data_path: Any = None
    """Held-out samples: validation loss every eval_every steps and at the end."""
    use_grad_ckpt: bool = False
    """Recompute each block's activations in backward (less memory, ~1/3 more compute)."""
    seed: int = 42
    """Data order, dropout and from-scratch init."""
    pack: bool = False
    """Several samples per row (attention kept within each); false: one padded sample per row."""
    template: Any = None
    """Prompt template: a builtin name, a dict of fields or a JSON file (see data/); null: the
    model's own prompt_template.json if it has one (a model trained with this toolkit), else "default"."""
    train_on_prompt: bool = False
    """Also train prompt tokens."""
    skip_bad_samples: bool = False
    """Skip (and count) invalid samples instead of stopping at the first one."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many of the newest complete checkpoints to keep."""
    export_every: int = 0
    """Also write the weights as a pipeline dir every N steps (0: only the final weights)."""
    eval_every: int = 0
    """Validation loss every N steps when eval_data_path is set (0: only at the end)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (default: n_epochs over the data)."""
    no_decay: list[str] = field(default_factory=lambda: ["bias", "norm"])
    """Parameters whose name contains one of these get no weight decay."""
    data_cache_dir: Path | None = None
    """Where tokenized data is cached (default: save_path/data_cache)."""
    ds: dict[str, Any] = field(default_factory=dict)
    """DeepSpeed's own keys, exactly as written in the file."""


# key -> (type check, expected description); model_topo is parsed separately
_SCALARS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "from_scratch": (bool, "true or false"), "use_grad_ckpt": (bool, "true or false"),
    "pack": (bool, "true or false"), "train_on_prompt": (bool, "true or false"),
    "skip_bad_samples": (bool, "true or false"), "seed": (int, "an integer"),
    "max_seq_len": (int, "an integer >= 2"), "n_epochs": (int, "an integer >= 1"),
    "checkpoint_every": (int, "an integer >= 0"), "keep_checkpoints": (int, "an integer >= 1"),
    "export_every": (int, "an integer >= 0"), "eval_every": (int, "an integer >= 0"),
    "max_steps": ((int, type(None)), "an integer >= 1 or null"),
}
_MINIMUM = {"max_seq_len": 2, "n_epochs": 1, "checkpoint_every": 0, "keep_checkpoints": 1, "export_every": 0,
            "eval_every": 0, "max_steps": 1}
TOOLKIT_KEYS = {f for f in TrainConfig.__dataclass_fields__ if f not in ("topology", "ds")} | {"model_topo"}
REQUIRED = ("model_path", "data_path", "save_path", "max_seq_len", "model_topo")


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read the JSON config; `overrides` are KEY=VALUE strings (see apply_overrides)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold one JSON object, got {type(raw).__name__}")
    return parse_config(apply_overrides(raw, overrides))


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`save_path=runs/x`, `optimizer.params.lr=1e-4`, `model_topo.parts=[2,2]`: a copy of the
    config with these set. Values are JSON where they parse as JSON, else strings."""
    out = json.loads(json.dumps(raw))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. save_path=runs/x or optimizer.params.lr=1e-4")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a JSON object in the config")
        node[leaf] = value
    return out


def parse_config(raw: dict[str, Any]) -> TrainConfig:
    """Validate and type the toolkit's keys; keep DeepSpeed's keys as they are."""
    _reject_unknown_keys(raw)
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise ConfigError(f"the config lacks required key(s) {missing}; see configs/tiny_cpu.json for an example")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SCALARS:
            values[key] = _scalar(key, value)
    for key in ("model_path", "save_path", "data_cache_dir"):
        if raw.get(key) is not None:
            if not isinstance(raw[key], str) or not raw[key]:
                raise ConfigError(f"{key} must be a path string, got {raw[key]!r}")
            values[key] = Path(raw[key])
    no_decay = raw.get("no_decay", ["bias", "norm"])
    if not (isinstance(no_decay, list) and all(isinstance(s, str) for s in no_decay)):
        raise ConfigError(f"no_decay must be a list of name fragments such as [\"bias\", \"norm\"], got {no_decay!r}")
    ds = {k: v for k, v in raw.items() if k not in TOOLKIT_KEYS}
    return TrainConfig(
        data_path=raw["data_path"], eval_data_path=raw.get("eval_data_path"), template=raw.get("template"),
        topology=_topology(raw["model_topo"]), no_decay=no_decay, ds=ds, **values)


def _reject_unknown_keys(raw: dict[str, Any]) -> None:
    known_ds = deepspeed_keys()
    for key in raw:
        if key in TOOLKIT_KEYS or key in known_ds:
            continue
        close = difflib.get_close_matches(key, sorted(TOOLKIT_KEYS | known_ds), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown config key {key!r}: it is neither a toolkit key ({', '.join(sorted(TOOLKIT_KEYS))}) "
                          f"nor a DeepSpeed key{hint}")


def _scalar(key: str, value: Any) -> Any:
    kind, expected = _SCALARS[key]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if ok and isinstance(value, int) and not isinstance(value, bool) and value < _MINIMUM.get(key, value):
        ok = False
    if not ok:
        raise ConfigError(f"{key} must be {expected}, got {value!r}")
    return value


def _topology(topo: Any) -> Topology:
    if not isinstance(topo, dict) or "process_topology" not in topo:
        raise ConfigError('model_topo must be {"process_topology": {"axes": ["pipe", "data"], "dims": [P, D]}, '
                          f'"parts": [...] or "auto"}}, got {topo!r}')
    unknown = set(topo) - {"process_topology", "parts"}
    if unknown:
        raise ConfigError(f"model_topo has unknown key(s) {sorted(unknown)}; it takes process_topology and parts")
    proc = topo["process_topology"]
    axes = proc.get("axes", proc.get("axis")) if isinstance(proc, dict) else None
    dims = proc.get("dims") if isinstance(proc, dict) else None
    if sorted(axes or []) != ["data", "pipe"]:
        raise ConfigError(f'model_topo.process_topology.axes must name "pipe" and "data" (e.g. ["pipe", "data"]), '
                          f"got {axes!r}")
    if not (isinstance(dims, list) and len(dims) == 2 and all(isinstance(d, int) and not isinstance(d, bool)
                                                              and d >= 1 for d in dims)):
        raise ConfigError(f"model_topo.process_topology.dims must be two positive integers [P, D], got {dims!r}")
    sizes = dict(zip(axes, dims))
    parts = topo.get("parts", "auto")
    if not (parts == "auto" or (isinstance(parts, list) and all(isinstance(p, int) and not isinstance(p, bool)
                                                                 for p in parts))):
        raise ConfigError(f'model_topo.parts must be a list of layer counts (one per stage) or "auto", got {parts!r}')
    return Topology(pipe=sizes["pipe"], data=sizes["data"], parts=parts, axes=tuple(axes))


# ---------------------------------------------------------------------------------------------
# Derived values


@dataclass(frozen=True)
class BatchShape:
    micro: int
    """Rows per micro-batch on one data-parallel rank (train_micro_batch_size_per_gpu)."""
    accum: int
    """Micro-batches per step (gradient_accumulation_steps)."""
    data: int
    """Data-parallel ranks."""

    @property
    def global_rows(self) -> int:
        return self.micro * self.accum * self.data


def batch_shape(ds: dict[str, Any], data_parallel: int) -> BatchShape:
    """Resolve DeepSpeed's three batch keys (any two, or micro alone) the way DeepSpeed does, with
    an error that says which combination is inconsistent."""
    total, micro, accum = (ds.get(k) for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                               "gradient_accumulation_steps"))
    for key, value in (("train_batch_size", total), ("train_micro_batch_size_per_gpu", micro),
                       ("gradient_accumulation_steps", accum)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    if micro is None and total is None:
        raise ConfigError("set train_micro_batch_size_per_gpu (and gradient_accumulation_steps or train_batch_size)")
    if micro is None:
        accum = accum or 1
        micro, rem = divmod(total, accum * data_parallel)
        if rem or micro == 0:
            raise ConfigError(f"train_batch_size {total} is not divisible by gradient_accumulation_steps {accum} x "
                              f"data-parallel size {data_parallel}; make it a multiple of {accum * data_parallel}")
    elif accum is None:
        accum, rem = divmod(total or micro * data_parallel, micro * data_parallel)
        if rem or accum == 0:
            raise ConfigError(f"train_batch_size {total} is not a multiple of train_micro_batch_size_per_gpu {micro} x "
                              f"data-parallel size {data_parallel} = {micro * data_parallel}")
    shape = BatchShape(micro=micro, accum=accum, data=data_parallel)
    if total is not None and total != shape.global_rows:
        raise ConfigError(
            f"train_batch_size {total} != train_micro_batch_size_per_gpu {micro} x gradient_accumulation_steps "
            f"{accum} x data-parallel size {data_parallel} = {shape.global_rows}; fix one of the three keys")
    return shape
