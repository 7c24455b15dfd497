"""Config validation: typed toolkit keys, DeepSpeed keys untouched, derived values, clear errors."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.config import BatchShape, ConfigError, batch_shape, load_config, parse_config
from training.optim import check_deepspeed_keys, deepspeed_config, param_groups

REPO = Path(__file__).resolve().parents[1]
BASE = {
    "model_path": "runs/pp", "data_path": "data/samples", "save_path": "runs/out", "max_seq_len": 64,
    "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
    "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [2, 2]},
}


def cfg(**changes: object) -> dict:
    raw = copy.deepcopy(BASE)
    raw.update(changes)
    return raw


def test_toolkit_keys_are_typed_and_deepspeed_keys_kept_verbatim() -> None:
    raw = cfg(optimizer={"type": "AdamW", "params": {"lr": 1e-4}}, zero_optimization={"stage": 1},
              gradient_clipping=0.5, use_grad_ckpt=True)
    c = parse_config(raw)
    assert c.model_path == Path("runs/pp") and c.use_grad_ckpt is True and c.max_seq_len == 64
    assert (c.topology.pipe, c.topology.data, c.topology.parts) == (2, 1, [2, 2])
    assert c.ds == {k: raw[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                        "optimizer", "zero_optimization", "gradient_clipping")}


def test_seed_spelling_axis_is_accepted() -> None:
    raw = cfg(model_topo={"process_topology": {"axis": ["pipe", "data"], "dims": [8, 1]},
                          "parts": [1, 5, 5, 5, 5, 5, 5, 1]})
    assert parse_config(raw).topology.pipe == 8


@pytest.mark.parametrize("changes, message", [
    ({"use_grad_chkpt": True}, r"unknown config key 'use_grad_chkpt'.*did you mean 'use_grad_ckpt'"),
    ({"max_seq_len": "512"}, r"max_seq_len must be an integer >= 2, got '512'"),
    ({"n_epochs": 0}, r"n_epochs must be an integer >= 1, got 0"),
    ({"pack": "yes"}, r"pack must be true or false, got 'yes'"),
    ({"model_topo": {"process_topology": {"axes": ["pipe", "model"], "dims": [2, 1]}}}, r'axes must name "pipe" and "data"'),
    ({"model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 0]}}}, r"dims must be two positive integers"),
    ({"model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": "even"}},
     r'parts must be a list of layer counts \(one per stage\) or "auto"'),
    ({"no_decay": "bias"}, r"no_decay must be a list of name fragments"),
])
def test_bad_values_name_key_value_and_expectation(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(cfg(**changes))


def test_overrides_from_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg(optimizer={"type": "AdamW", "params": {"lr": 1e-4}})))
    c = load_config(path, ["save_path=runs/other", "optimizer.params.lr=3e-5", "model_topo.parts=[1,3]",
                           "pack=true"])
    assert c.save_path == Path("runs/other") and c.ds["optimizer"]["params"]["lr"] == 3e-5
    assert c.topology.parts == [1, 3] and c.pack is True
    assert json.loads(path.read_text())["save_path"] == "runs/out"  # the file is not touched
    with pytest.raises(ConfigError, match="write KEY=VALUE"):
        load_config(path, ["lr"])
    with pytest.raises(ConfigError, match="unknown config key 'lr'"):
        load_config(path, ["lr=3"])


def test_missing_required_key() -> None:
    raw = cfg()
    del raw["save_path"]
    with pytest.raises(ConfigError, match=r"lacks required key\(s\) \['save_path'\]"):
        parse_config(raw)


def test_broken_json_file(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"model_path": "x",\n "max_seq_len": 12,,\n}')
    with pytest.raises(ConfigError, match=r"c.json is not valid JSON: .* line 2, column"):
        load_config(path)


@pytest.mark.parametrize("ds, dp, expected", [
    ({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4}, 2, BatchShape(2, 4, 2)),
    ({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2}, 2, BatchShape(2, 4, 2)),
    ({"train_batch_size": 16, "gradient_accumulation_steps": 2}, 4, BatchShape(2, 2, 4)),
    ({"train_micro_batch_size_per_gpu": 3}, 1, BatchShape(3, 1, 1)),
])
def test_batch_shape_resolution(ds: dict, dp: int, expected: BatchShape) -> None:
    assert batch_shape(ds, dp) == expected


@pytest.mark.parametrize("ds, dp, message", [
    ({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}, 2,
     r"train_batch_size 10 != train_micro_batch_size_per_gpu 2 x gradient_accumulation_steps 2 x data-parallel size 2 = 8"),
    ({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4}, 1, r"not a multiple of .* = 4"),
    ({"train_micro_batch_size_per_gpu": 0}, 1, r"train_micro_batch_size_per_gpu must be a positive integer, got 0"),
    ({"gradient_accumulation_steps": 2}, 1, r"set train_micro_batch_size_per_gpu"),
])
def test_inconsistent_batch_sizes(ds: dict, dp: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        batch_shape(ds, dp)


@pytest.mark.parametrize("ds, cuda, message", [
    ({"zero_optimization": {"stage": 3}}, True, r"stage 3 cannot be combined with pipeline parallelism"),
    ({"fp16": {"enabled": True}}, False, r"fp16 needs a CUDA GPU"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, True, r"fp16 and bf16 are both enabled"),
    ({"optimizer": {"type": "Lion", "params": {"lr": 1e-4, "momentum": 0.9}}}, True, r"unknown: \['momentum'\]"),
])
def test_deepspeed_combinations_rejected_early(ds: dict, cuda: bool, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_deepspeed_keys(ds, cuda=cuda)


def test_derived_deepspeed_config_leaves_user_dict_alone() -> None:
    raw = cfg(scheduler={"type": "WarmupDecayLR", "params": {"warmup_num_steps": 10}},
              optimizer={"type": "Lion", "params": {"lr": 1e-4, "use_triton": True}},
              zero_optimization={"stage": 1, "offload_optimizer": {"device": "cpu"}})
    c = parse_config(raw)
    before = copy.deepcopy(c.ds)
    ds = deepspeed_config(c, BatchShape(2, 2, 1), total_steps=123, cuda=True)
    assert c.ds == before  # derived values go into a copy
    assert ds["scheduler"]["params"] == {"warmup_num_steps": 10, "total_num_steps": 123}
    assert "optimizer" not in ds and ds["zero_allow_untested_optimizer"] is True
    assert ds["zero_force_ds_cpu_optimizer"] is False
    assert ds["train_batch_size"] == 4


def test_adam_uses_torch_implementation_without_cuda() -> None:
    c = parse_config(cfg(optimizer={"type": "AdamW", "params": {"lr": 1e-4}}))
    assert deepspeed_config(c, BatchShape(2, 2, 1), 10, cuda=False)["optimizer"]["params"]["torch_adam"] is True
    assert "torch_adam" not in deepspeed_config(c, BatchShape(2, 2, 1), 10, cuda=True)["optimizer"]["params"]


def test_no_decay_groups() -> None:
    import torch

    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(4, 4), "attn_norm": torch.nn.LayerNorm(4)})
    decay, keep = param_groups(model, ["bias", "norm"])
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(keep["params"]) == 3 and keep["weight_decay"] == 0.0 and "weight_decay" not in decay


def test_cli_fails_before_building_anything(tmp_path: Path) -> None:
    """dims product vs world size: caught before DeepSpeed builds a model, with the fix."""
    raw = cfg(save_path=str(tmp_path / "out"))
    (tmp_path / "c.json").write_text(json.dumps(raw))
    done = subprocess.run([sys.executable, "train_ds.py", "--config", str(tmp_path / "c.json")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "pipe=2 x data=1 = 2 but 1 processes were launched" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()
