"""demo.py: DeepSpeed inference with AutoTP, the chat template, history, errors.

Tiny random llama (GQA) and bloom models with a local character-level tokenizer are built in a
temp dir; transformers' own ``generate`` is the reference. The multi-process tests launch
``deepspeed --num_gpus 2 demo.py`` (two CPU processes over gloo on a machine without GPUs).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import demo  # noqa: E402
from inference import DemoError, SamplingOptions, fit_history, stop_token_ids  # noqa: E402

PROMPT = "hello there"
MAX_NEW = 12
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
VOCAB_SIZE = 256
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}</s>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def make_tokenizer() -> Any:
    """Character-level tokenizer with exactly VOCAB_SIZE tokens, so every id decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    chars += [chr(c) for c in range(0x3b1, 0x3b1 + VOCAB_SIZE - len(SPECIALS) - len(chars))]  # Greek and up
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>",
                                        additional_special_tokens=SPECIALS[4:])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_model(family: str) -> torch.nn.Module:
    """Random tiny models; the large init keeps greedy logits far from ties, and these seeds give
    answers that vary from token to token."""
    from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

    ids = dict(vocab_size=VOCAB_SIZE, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        torch.manual_seed(3)
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             initializer_range=0.3, **ids)
        return LlamaForCausalLM(config).eval()
    torch.manual_seed(1)
    config = BloomConfig(hidden_size=64, n_layer=2, n_head=4, initializer_range=0.5, **ids)  # tied embeddings
    return BloomForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo_models")
    dirs = {}
    for family in ("llama", "bloom"):
        dirs[family] = root / family
        make_model(family).save_pretrained(dirs[family])
        make_tokenizer().save_pretrained(dirs[family])
    return dirs


def reference(model_dir: Path, messages: list[dict[str, str]],
              max_new: int = MAX_NEW) -> tuple[list[int], list[int]]:
    """transformers alone: (prompt ids, greedy new ids)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    out = model.generate(**enc, do_sample=False, max_new_tokens=max_new)
    prompt = enc["input_ids"][0].tolist()
    return prompt, out[0, len(prompt):].tolist()


def read_turns(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def greedy_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model_dir), "--temperature", "0", "--max-new-tokens", str(MAX_NEW),
            "--output-json", str(out), *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(cmd: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, cwd=REPO, input=stdin, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


# ---------------------------------------------------------------------------------------------
# one rank, in-process
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_one_rank_greedy_equals_transformers(family: str, model_dirs: dict[str, Path],
                                             tmp_path: Path) -> None:
    out = tmp_path / "turns.jsonl"
    assert demo.main(greedy_args(model_dirs[family], out, "--prompt", PROMPT)) == 0
    (turn,) = read_turns(out)
    prompt_ids, new_ids = reference(model_dirs[family], [{"role": "user", "content": PROMPT}])
    assert turn["prompt_ids"] == prompt_ids
    assert turn["output_ids"] == new_ids
    assert len(set(new_ids)) > 3, "the test model should not repeat one token"
    assert turn["text"] == make_tokenizer().decode(new_ids, skip_special_tokens=True)


def test_without_chat_template_falls_back_to_plain_text(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(model_dirs["llama"], plain)
    (plain / "chat_template.jinja").unlink()
    out = tmp_path / "turns.jsonl"
    with pytest.warns(UserWarning, match="no chat_template"):
        assert demo.main(greedy_args(plain, out, "--prompt", PROMPT)) == 0
    (turn,) = read_turns(out)
    assert turn["prompt"] == PROMPT
    assert len(turn["output_ids"]) == MAX_NEW


# ---------------------------------------------------------------------------------------------
# the script itself: interactive chat through stdin
# ---------------------------------------------------------------------------------------------


def test_interactive_keeps_history_and_resets(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "turns.jsonl"
    stdin = "what is 2+2?\n\n/help\nsecond question\n/reset\nfirst question\n/exit\nnever read\n"
    args = greedy_args(model_dirs["llama"], out, "--system", "be brief")
    proc = run_script([sys.executable, "demo.py", *args], stdin=stdin)
    first, second, third = read_turns(out)
    assert "/reset clears the history" in proc.stdout
    # the second prompt is the whole conversation so far, rendered by the chat template
    system = {"role": "system", "content": "be brief"}
    history = [system, {"role": "user", "content": "what is 2+2?"},
               {"role": "assistant", "content": first["text"]},
               {"role": "user", "content": "second question"}]
    assert first["text"] and first["text"] in second["prompt"]
    assert (second["prompt_ids"], second["output_ids"]) == reference(model_dirs["llama"], history)
    # after /reset only the system message remains; this model answers that prompt with eos at once
    fresh = reference(model_dirs["llama"], [system, {"role": "user", "content": "first question"}])
    assert (third["prompt_ids"], third["output_ids"], third["text"]) == (*fresh, "")
    assert fresh[1] == [2], "generation stops at the eos token"


# ---------------------------------------------------------------------------------------------
# two ranks through the deepspeed launcher
# ---------------------------------------------------------------------------------------------


@pytest.mark.multiproc
@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_two_ranks_greedy_equals_one_rank(family: str, model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """AutoTP over 2 CPU ranks gives the same tokens as transformers on one (which the one-rank
    test holds demo.py to). llama goes through the interactive path (rank 0 reads stdin and
    broadcasts), bloom through --prompt."""
    out = tmp_path / "turns.jsonl"
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2",
                "--master_port", str(free_port()), "demo.py", *greedy_args(model_dirs[family], out)]
    user = {"role": "user", "content": PROMPT}
    if family == "llama":
        run_script(launcher, stdin=f"{PROMPT}\nand then?\n")  # EOF ends the chat
        first, second = read_turns(out)
        history = [user, {"role": "assistant", "content": first["text"]},
                   {"role": "user", "content": "and then?"}]
        assert (second["prompt_ids"], second["output_ids"]) == reference(model_dirs[family], history)
    else:
        run_script(launcher + ["--prompt", PROMPT])
        (first,) = read_turns(out)
    assert (first["prompt_ids"], first["output_ids"]) == reference(model_dirs[family], [user])


# ---------------------------------------------------------------------------------------------
# errors and small pieces
# ---------------------------------------------------------------------------------------------


def _gpt2_dir(tmp_path: Path) -> Path:
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return tmp_path / "gpt2"


@pytest.mark.parametrize("case, extra, message", [
    ("missing", [], "does not exist"),
    ("empty", [], "has no config.json"),
    ("gpt2", [], "'gpt2' .* not supported; supported: llama, mistral, qwen2, bloom"),
    ("llama", ["--temperature", "-0.1"], r"--temperature must be >= 0 \(0 = greedy\), got -0.1"),
    ("llama", ["--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    ("llama", ["--top-p", "1.5"], r"--top-p must be in \(0, 1\].*got 1.5"),
    ("llama", ["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
])
def test_clear_errors(case: str, extra: list[str], message: str, model_dirs: dict[str, Path], tmp_path: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    paths = {"missing": tmp_path / "nope", "empty": tmp_path, "gpt2": _gpt2_dir(tmp_path),
             "llama": model_dirs["llama"]}
    with pytest.raises(SystemExit) as exc:
        demo.main(["--model", str(paths[case]), "--prompt", "x", *extra])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_too_long_prompt_is_an_error_not_a_crash(model_dirs: dict[str, Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # max_position_embeddings is 256: 250 new tokens leave 6 for the prompt
    argv = ["--model", str(model_dirs["llama"]), "--prompt", PROMPT, "--max-new-tokens", "250"]
    assert demo.main(argv) == 2
    assert "only 6 fit" in capsys.readouterr().err


def test_fit_history_drops_oldest_exchanges_keeps_system() -> None:
    def render(messages: list[dict[str, str]]) -> list[int]:
        return [0] * sum(len(m["content"]) for m in messages)

    sys_msg = {"role": "system", "content": "s"}
    msgs = [sys_msg, {"role": "user", "content": "aaaa"}, {"role": "assistant", "content": "bbbb"},
            {"role": "user", "content": "cc"}, {"role": "assistant", "content": "dd"},
            {"role": "user", "content": "e"}]
    kept, ids, dropped = fit_history(msgs, render, budget=6)
    assert kept == [sys_msg] + msgs[3:] and len(ids) == 6 and dropped == 2
    assert fit_history(msgs, render, budget=100)[2] == 0
    with pytest.raises(DemoError, match="only 1 fit"):
        fit_history(msgs, render, budget=1)


def test_stop_tokens_join_tokenizer_and_generation_config() -> None:
    class Tok:
        eos_token_id = 2

    class Gen:
        eos_token_id = [7, 2]

    assert stop_token_ids(Tok(), Gen()) == [7, 2]
    assert stop_token_ids(Tok(), None) == [2]
    assert SamplingOptions(temperature=0).greedy
