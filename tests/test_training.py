"""train_ds.py end to end on the CPU: distributed results against a one-process reference,
exact resume after a kill, faults, Lion, grad checkpointing, and a two-node launch on one machine.

Multi-process tests launch DeepSpeed's own launcher (marked `multiproc`); models are tiny.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_trainable_model
from transformers import AutoTokenizer

from data import DataSettings, load_rows
from models.common import token_loss_sum
from models.convert import hg_to_pp
from models.pipedir import WEIGHTS_SUBDIR, layer_file
from models.stack import LayerStack, layer_tensors
from training.checkpoint import CHECKPOINTS, COMPLETE
from training.config import BatchShape
from training.cpu_comm import shm_buffers
from training.loader import Schedule, eval_batches
from training.optim import param_groups

REPO = Path(__file__).resolve().parents[1]
FAULTS = REPO / "tests" / "fixtures" / "train_faults.py"
DATA = REPO / "data" / "samples"
EVAL = REPO / "data" / "samples" / "ref_qa.json"
ADAMW = {"lr": 2e-3, "betas": [0.9, 0.95], "eps": 1e-5, "weight_decay": 0.1}


@pytest.fixture(scope="module")
def pp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Pipeline dirs of tiny trainable models (shipped tokenizer)."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name in ("llama", "llama_tied", "bloom"):
        hf = save_trainable_model(name, root / f"{name}_hf")
        out[name] = hg_to_pp(str(hf), str(root / f"{name}_pp"), progress=False)
    return out


def write_config(path: Path, model: Path, save: Path, *, pipe: int, data: int, **extra: Any) -> Path:
    cfg = {"model_path": str(model), "data_path": str(DATA), "save_path": str(save), "max_seq_len": 64,
           "n_epochs": 1, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
           "gradient_clipping": 0.0, "optimizer": {"type": "AdamW", "params": dict(ADAMW)},
           "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [pipe, data]}, "parts": "auto"}}
    cfg.update(extra)
    path.write_text(json.dumps(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def release_buffers(port: int) -> None:
    """Ranks killed on purpose cannot unlink DeepSpeed's CPU all-reduce buffers themselves."""
    for path in shm_buffers(port):
        path.unlink(missing_ok=True)


def launch(config: Path, *, procs: int, faults: str = "", timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIPEFT_FAULT": faults, "PYTHONUNBUFFERED": "1"}
    if procs == 1:  # no launcher: train_ds.py makes a world of one process itself
        return subprocess.run([sys.executable, str(FAULTS), "--config", str(config)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=timeout)
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(procs), "--master_port", str(port),
           str(FAULTS), "--config", str(config)]
    try:
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        release_buffers(port)


def ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def curve(save: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (redone after a resume) keeps its last value."""
    out = {}
    for line in (save / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def exported(save: Path, step: int) -> dict[str, torch.Tensor]:
    directory = save / WEIGHTS_SUBDIR / f"step_{step:08d}"
    out = {}
    for path in sorted(directory.glob("layer_*.safetensors")):
        out.update({f"{path.stem}/{k}": v for k, v in load_file(str(path)).items()})
    return out


# ---------------------------------------------------------------------------------------------
# A one-process reference: our layers in sequence, torch's AdamW, the same global batches.


def reference(pp_dir: Path, *, shape: BatchShape, steps: int, eval_path: Path | None = None):
    tokenizer = AutoTokenizer.from_pretrained(str(pp_dir))
    rows = load_rows(DataSettings(paths=str(DATA), max_seq_len=64), tokenizer)
    schedule = Schedule(n_rows=len(rows), shape=shape, seed=42, n_epochs=1)
    stack = LayerStack.from_pipeline_dir(pp_dir).train()
    opt = torch.optim.AdamW(param_groups(stack, ["bias", "norm"]), lr=ADAMW["lr"], betas=tuple(ADAMW["betas"]),
                            eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"])
    losses = {}
    for step in range(steps):
        idx = schedule.step_rows(step)
        batch = [torch.from_numpy(a[idx].astype("int64")) for a in
                 (rows.input_ids, rows.position_ids, rows.segment_ids, rows.targets)]
        logits, targets = stack(*batch)
        loss = token_loss_sum(logits, targets) / int(rows.n_trained[idx].sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses[step + 1] = loss.item()
    eval_loss = None
    if eval_path is not None:
        eval_rows = load_rows(DataSettings(paths=str(eval_path), max_seq_len=64), tokenizer)
        with torch.no_grad():
            total = 0.0
            for batch in eval_batches(eval_rows, BatchShape(len(eval_rows), 1, 1), 0, tokenizer.pad_token_id):
                for inputs, _ in batch:
                    total += float(token_loss_sum(*stack.eval()(*inputs)))
        eval_loss = total / int(eval_rows.n_trained.sum())
    weights = {f"{Path(layer_file(l)).stem}/{k}": v for l, t in layer_tensors(stack.pairs()).items()
               for k, v in t.items()}
    return losses, weights, eval_loss


def assert_weights_close(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == ref.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-5, atol=2e-6, msg=lambda m, k=key: f"{k}: {m}")


def assert_matches_reference(save: Path, pp_dir: Path, *, shape: BatchShape, steps: int) -> None:
    """The run's loss curve and final weights equal the one-process reference's."""
    losses, weights, _ = reference(pp_dir, shape=shape, steps=steps)
    ours = curve(save)
    for step in losses:
        assert ours[step] == pytest.approx(losses[step], rel=1e-6)
    assert_weights_close(exported(save, steps), weights)


@pytest.mark.multiproc
def test_two_stage_pipeline_matches_one_process(pp: dict[str, Path], tmp_path: Path) -> None:
    """pipe=2 x data=1 with the embedding tied across the two stages: loss, updated weights and
    eval loss equal a one-process reference on the same global batches."""
    save = tmp_path / "run"
    config = write_config(tmp_path / "c.json", pp["llama_tied"], save, pipe=2, data=1, max_steps=2,
                          eval_data_path=str(EVAL))
    ok(launch(config, procs=2))
    losses, weights, eval_loss = reference(pp["llama_tied"], shape=BatchShape(2, 2, 1), steps=2, eval_path=EVAL)
    ours = curve(save)
    assert ours.keys() == losses.keys()
    for step in losses:
        assert ours[step] == pytest.approx(losses[step], rel=1e-6)
    assert_weights_close(exported(save, 2), weights)
    evals = [json.loads(x)["eval_loss"] for x in (save / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    assert evals[-1] == pytest.approx(eval_loss, rel=1e-5)


@pytest.mark.multiproc
def test_data_parallel_zero1_matches_one_process(pp: dict[str, Path], tmp_path: Path) -> None:
    """pipe=1 x data=2 with ZeRO stage 1 (optimizer states split over the two ranks), bloom."""
    save = tmp_path / "run"
    config = write_config(tmp_path / "c.json", pp["bloom"], save, pipe=1, data=2, max_steps=2,
                          gradient_accumulation_steps=1, zero_optimization={"stage": 1})
    ok(launch(config, procs=2))
    assert_matches_reference(save, pp["bloom"], shape=BatchShape(2, 1, 2), steps=2)


# ---------------------------------------------------------------------------------------------
# Resume


RESUME = {"max_steps": 6, "checkpoint_every": 2, "zero_optimization": {"stage": 1},
          "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 2, "warmup_min_ratio": 0.1}}}


@pytest.fixture(scope="module")
def uninterrupted(pp: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    ok(launch(write_config(root / "c.json", pp["llama"], root / "run", pipe=2, data=1, **RESUME), procs=2))
    return root / "run"


@pytest.mark.multiproc
def test_killed_run_resumes_exactly(pp: dict[str, Path], uninterrupted: Path, tmp_path: Path) -> None:
    """SIGKILL the whole job mid-way; the same command continues from the newest complete
    checkpoint and reproduces the uninterrupted loss curve and final weights bit for bit."""
    save = tmp_path / "run"
    config = write_config(tmp_path / "c.json", pp["llama"], save, pipe=2, data=1, **RESUME)
    env = {**os.environ, "PIPEFT_FAULT": "slow:0.7"}
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
           str(FAULTS), "--config", str(config)]
    job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (save / "metrics.jsonl").exists() or len(curve(save)) < 3:
        assert job.poll() is None, "the job ended before it could be killed"
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    release_buffers(port)
    killed_at = max(curve(save))
    assert killed_at < 6
    ok(launch(config, procs=2))
    assert curve(save) == curve(uninterrupted)  # exact, every step
    ours, theirs = exported(save, 6), exported(uninterrupted, 6)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.multiproc
def test_kill_during_checkpoint_save_keeps_previous_one(pp: dict[str, Path], uninterrupted: Path,
                                                        tmp_path: Path) -> None:
    save = tmp_path / "run"
    config = write_config(tmp_path / "c.json", pp["llama"], save, pipe=2, data=1, **RESUME)
    done = launch(config, procs=2, faults="die_in_save:4")
    assert done.returncode != 0
    ckpts = save / CHECKPOINTS
    assert (ckpts / "step_00000004").is_dir() and not (ckpts / "step_00000004" / COMPLETE).exists()
    assert (ckpts / "step_00000002" / COMPLETE).is_file()
    ok(launch(config, procs=2))  # resumes from step 2
    assert curve(save) == curve(uninterrupted)
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000004", "step_00000006"]  # keep_checkpoints=2
    assert all((ckpts / n / COMPLETE).is_file() for n in ("step_00000004", "step_00000006"))
    ours, theirs = exported(save, 6), exported(uninterrupted, 6)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


# ---------------------------------------------------------------------------------------------
# Faults


@pytest.mark.multiproc
def test_dead_rank_ends_the_job_promptly(pp: dict[str, Path], tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.json", pp["llama"], tmp_path / "run", pipe=2, data=1, max_steps=6)
    started = time.time()
    done = launch(config, procs=2, faults="die:2:1", timeout=180)
    assert done.returncode != 0
    assert time.time() - started < 120  # the launcher stops the surviving rank instead of letting it wait


def test_nan_loss_names_step_and_samples(pp: dict[str, Path], tmp_path: Path) -> None:
    save = tmp_path / "run"
    config = write_config(tmp_path / "c.json", pp["llama"], save, pipe=1, data=1, max_steps=4, checkpoint_every=1)
    done = launch(config, procs=1, faults="nan:3")
    assert done.returncode == 2
    assert "loss is nan at step 3; the samples of the micro-batch(es): [(" in done.stderr
    assert "samples/" in done.stderr and "the newest checkpoint is step 2" in done.stderr
    assert not (save / CHECKPOINTS / "step_00000003").exists()  # nothing saved after the bad step


# ---------------------------------------------------------------------------------------------
# Options


def test_lion_trains(pp: dict[str, Path], tmp_path: Path) -> None:
    save = tmp_path / "run"
    config = write_config(tmp_path / "c.json", pp["llama"], save, pipe=1, data=1, n_epochs=3,
                          optimizer={"type": "Lion", "params": {"lr": 1e-3, "betas": [0.9, 0.99],
                                                                "weight_decay": 0.01, "use_triton": True}})
    ok(launch(config, procs=1))
    losses = curve(save)
    first, last = [losses[s] for s in sorted(losses)[:3]], [losses[s] for s in sorted(losses)[-3:]]
    assert sum(last) < 0.9 * sum(first)


def test_grad_checkpointing_gives_the_same_training(pp: dict[str, Path], tmp_path: Path) -> None:
    runs = []
    for ckpt in (False, True):
        save = tmp_path / f"run_{ckpt}"
        ok(launch(write_config(tmp_path / f"c{ckpt}.json", pp["llama"], save, pipe=1, data=1, max_steps=2,
                               use_grad_ckpt=ckpt), procs=1))
        runs.append((curve(save), exported(save, 2)))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_from_scratch_needs_only_config_and_tokenizer(tmp_path: Path) -> None:
    save = tmp_path / "run"
    config = write_config(tmp_path / "c.json", REPO / "configs" / "tiny-llama", save, pipe=1, data=1, max_steps=1,
                          from_scratch=True)
    ok(launch(config, procs=1))
    weights = exported(save, 1)
    assert weights["layer_000/embed.weight"].shape == (1536, 128)


@pytest.mark.multiproc
def test_two_nodes_on_one_machine(pp: dict[str, Path], tmp_path: Path) -> None:
    """DeepSpeed's launcher with a hostfile of two hosts, started once per node (--no_ssh,
    --node_rank), trains pipe=2 across them — the same result as the one-node launch."""
    (tmp_path / "hostfile").write_text("node-a slots=1\nnode-b slots=1\n")
    config = write_config(tmp_path / "c.json", pp["llama_tied"], tmp_path / "run", pipe=2, data=1, max_steps=2)
    port = str(free_port())
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    jobs = [subprocess.Popen([str(Path(sys.executable).parent / "deepspeed"), "--hostfile", str(tmp_path / "hostfile"),
                              "--no_ssh", "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", port,
                              str(FAULTS), "--config", str(config)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert not shm_buffers(port)  # each rank unlinked DeepSpeed's CPU all-reduce buffer
    _, weights, _ = reference(pp["llama_tied"], shape=BatchShape(2, 2, 1), steps=2)
    assert_weights_close(exported(tmp_path / "run", 2), weights)


def test_resume_refuses_a_checkpoint_of_another_model(pp: dict[str, Path], tmp_path: Path) -> None:
    save = tmp_path / "run"
    ok(launch(write_config(tmp_path / "a.json", pp["llama"], save, pipe=1, data=1, max_steps=1), procs=1))
    done = launch(write_config(tmp_path / "b.json", pp["bloom"], save, pipe=1, data=1, max_steps=2), procs=1)
    assert done.returncode == 2
    assert "was written by a different run layout (model: checkpoint 'llama, 2 blocks" in done.stderr
    assert "choose a new save_path" in done.stderr


def test_zero1_cpu_offload_matches_one_process(pp: dict[str, Path], tmp_path: Path) -> None:
    """ZeRO stage 1 with the optimizer offloaded to the CPU, as the seed configures it."""
    save = tmp_path / "run"
    config = write_config(tmp_path / "c.json", pp["llama"], save, pipe=1, data=1, max_steps=2,
                          zero_optimization={"stage": 1, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
                          zero_force_ds_cpu_optimizer=False)
    ok(launch(config, procs=1))
    assert_matches_reference(save, pp["llama"], shape=BatchShape(2, 2, 1), steps=2)


def test_bf16_training_follows_fp32(pp: dict[str, Path], tmp_path: Path) -> None:
    """bf16 weights and activations with DeepSpeed's bf16 optimizer (fp32 master weights): the loss
    curve stays within bf16 precision of the fp32 one, and the exported weights are bf16."""
    curves = {}
    for name, extra in (("fp32", {}), ("bf16", {"bf16": {"enabled": True}})):
        save = tmp_path / name
        ok(launch(write_config(tmp_path / f"{name}.json", pp["llama"], save, pipe=1, data=1, max_steps=4, **extra),
                  procs=1))
        curves[name] = curve(save)
    for step, loss in curves["fp32"].items():
        assert curves["bf16"][step] == pytest.approx(loss, rel=2e-2)
    assert exported(tmp_path / "bf16", 4)["layer_001/attn.q_proj.weight"].dtype == torch.bfloat16
