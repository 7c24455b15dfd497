"""Chat generation with DeepSpeed inference: tensor parallel over the launched ranks (AutoTP).

Used by ``demo.py``. Every rank loads the whole HF model, ``deepspeed.init_inference`` shards the
attention and MLP linears over the ranks (AutoTP) and the ranks then run ``generate`` in
lockstep: rank 0 reads the user's text and broadcasts it, every rank renders the same prompt with
the model's own chat template and samples with the same seed, and only rank 0 prints.

Works on CUDA (nccl) and on DeepSpeed's CPU accelerator (gloo), and in a plain ``python`` process
without the launcher (one rank, no process group).
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

import torch

from models.registry import SUPPORTED_MODEL_TYPES

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Context length when the config names none (bloom: ALiBi has no position table; 2048 is what
# the bloom models were trained with).
DEFAULT_CONTEXT = 2048
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "seq_length")
# Tokenizers without a real limit report ~1e30 as model_max_length.
_NO_LIMIT = 10**7


class DemoError(ValueError):
    """A problem the user can fix; the message says the value, the rule and the fix."""


# ---------------------------------------------------------------------------------------------
# Validation before any heavy work
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingOptions:
    """How each answer is generated (the same on every rank)."""

    max_new_tokens: int = 256
    """Upper bound on the answer's length in tokens."""
    temperature: float = 0.7
    """0 means greedy decoding (argmax); > 0 samples with this temperature."""
    top_p: float = 0.9
    """Nucleus sampling mass in (0, 1]; 1 disables it. Ignored when greedy."""
    top_k: int | None = None
    """Sample among the k most likely tokens; None keeps the model's generation_config (or
    transformers' default), 0 disables it. Ignored when greedy."""
    seed: int = 1234
    """Sampling seed, set identically on every rank so that they draw the same tokens."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise DemoError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # also rejects NaN
            raise DemoError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise DemoError(f"--top-p must be in (0, 1] (1 disables nucleus sampling), got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise DemoError(f"--top-k must be >= 0 (0 disables it), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def check_model_dir(path: str | os.PathLike[str]) -> str:
    """Check that ``path`` is an HF model dir of a supported family; return its model_type."""
    model_dir = Path(path)
    if not model_dir.exists():
        raise DemoError(f"--model {str(path)!r} does not exist; give the HF model dir that "
                        f"'python convert_model.py pp_to_hg' wrote (or any save_pretrained dir)")
    if not model_dir.is_dir():
        raise DemoError(f"--model {str(path)!r} is a file, not a directory; give the HF model dir")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise DemoError(f"--model {str(path)!r} has no config.json, so it is not an HF model dir; "
                        f"export a pipeline dir first with 'python convert_model.py pp_to_hg "
                        f"--input-path PP_DIR --save-path HF_DIR'")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise DemoError(f"{config_file} is not valid JSON ({err}); re-export the model") from err
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise DemoError(f"model_type {model_type!r} in {config_file} is not supported; supported: "
                        f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return model_type


# ---------------------------------------------------------------------------------------------
# Ranks, device, dtype
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ranks:
    """This process's place among the launched ones (rank 0 of 1 without a launcher)."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ranks_from_env() -> Ranks:
    """Read the launcher's RANK / WORLD_SIZE / LOCAL_RANK; a plain ``python`` run is 0 of 1."""
    return Ranks(rank=int(os.environ.get("RANK", "0")),
                 world_size=int(os.environ.get("WORLD_SIZE", "1")),
                 local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def setup_device(ranks: Ranks) -> str:
    """Pick this rank's device and join the process group when launched; return the device name."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(ranks.local_rank)
    if "WORLD_SIZE" in os.environ:
        # nccl on CUDA, gloo (or ccl) on DeepSpeed's CPU accelerator.
        deepspeed.init_distributed()
    return accelerator.current_device_name()


def resolve_dtype(name: str, *, config_dtype: Any, device: str) -> torch.dtype:
    """``auto``: fp32 on the CPU; on an accelerator the model's own bf16/fp16, else bf16 where
    supported and fp16 otherwise."""
    if name != "auto":
        return DTYPES[name]
    if device.startswith("cpu"):
        return torch.float32
    if isinstance(config_dtype, str):
        config_dtype = getattr(torch, config_dtype, None)
    if config_dtype in (torch.bfloat16, torch.float16):
        return config_dtype
    from deepspeed.accelerator import get_accelerator
    return torch.bfloat16 if get_accelerator().is_bf16_supported() else torch.float16


def context_limit(config: Any, tokenizer: Any) -> int:
    """Longest prompt + answer the model takes, from its config (or tokenizer, or a default)."""
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < _NO_LIMIT:
        return value
    return DEFAULT_CONTEXT


# ---------------------------------------------------------------------------------------------
# Model loading and sharding
# ---------------------------------------------------------------------------------------------


def load_tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as err:
        raise DemoError(f"could not load a tokenizer from {model_dir!r} ({err}); the model dir needs "
                        f"the tokenizer files beside the weights (tokenizer.save_pretrained)") from err


def load_model(model_dir: str, dtype: torch.dtype) -> torch.nn.Module:
    """The whole model on the CPU in ``dtype``; init_inference shards it and moves it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.eval()


# DeepSpeed's kernel-injection policies (deepspeed/module_inject/replace_policy.py) cover these.
KERNEL_INJECT_MODEL_TYPES = ("llama", "bloom")


def check_engine_options(*, model_type: str, dtype: torch.dtype, kernel_inject: bool) -> None:
    """Fail before loading the model on what DeepSpeed would reject later, less clearly."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if dtype not in accelerator.supported_dtypes():
        names = [name for name, d in DTYPES.items() if d in accelerator.supported_dtypes()]
        raise DemoError(f"--dtype {dtype} is not supported by DeepSpeed's {accelerator.device_name()!r} "
                        f"accelerator; use one of: auto, {', '.join(names)}")
    if kernel_inject and accelerator.device_name() != "cuda":
        raise DemoError(f"--kernel-inject needs CUDA (DeepSpeed's fused inference kernels), but the "
                        f"accelerator is {accelerator.device_name()!r}; drop --kernel-inject")
    if kernel_inject and model_type not in KERNEL_INJECT_MODEL_TYPES:
        raise DemoError(f"--kernel-inject has DeepSpeed kernels for {', '.join(KERNEL_INJECT_MODEL_TYPES)} "
                        f"only, not {model_type!r}; drop --kernel-inject (AutoTP works for all)")


def init_engine(model: torch.nn.Module, *, world_size: int, dtype: torch.dtype, kernel_inject: bool,
                max_tokens: int) -> Any:
    """Wrap ``model`` in DeepSpeed's InferenceEngine, sharded over ``world_size`` ranks (AutoTP,
    or DeepSpeed's CUDA kernels with ``kernel_inject``)."""
    import deepspeed

    # max_out_tokens: InferenceEngine.generate refuses longer prompts (default 1024).
    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": world_size}, dtype=dtype,
                                      replace_with_kernel_inject=kernel_inject, max_out_tokens=max_tokens)
    if world_size > 1 and not kernel_inject:
        keep_bloom_mask(engine.module)
    return engine


def keep_bloom_mask(model: torch.nn.Module) -> None:
    """Make bloom build its ALiBi bias through ``build_alibi_tensor`` on every forward.

    Under AutoTP each rank holds n_head / tp heads, and DeepSpeed replaces
    ``transformer.build_alibi_tensor`` with a version that keeps this rank's heads
    (deepspeed/inference/engine.py ``build_alibi_tensor``). But transformers 5 ``generate`` drops
    an all-ones attention mask, and BloomModel then builds ALiBi inline for all heads
    (modeling_bloom.py, ``if attention_mask is None``), which fails with "expanded size of the
    tensor (2) must match (4)". Putting back the all-ones mask sends every forward through the
    sharded builder; the mask changes nothing else.
    """
    transformer = getattr(model, "transformer", None)
    if transformer is None or not hasattr(transformer, "build_alibi_tensor"):
        return
    transformer.register_forward_pre_hook(_fill_attention_mask, with_kwargs=True)


def _fill_attention_mask(module: torch.nn.Module, args: tuple[Any, ...],
                         kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if kwargs.get("attention_mask") is not None:
        return args, kwargs
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = args[0] if args else kwargs["inputs_embeds"][..., 0]
    batch, new = tokens.shape[:2]
    cache = kwargs.get("past_key_values")
    past = cache.get_seq_length() if cache is not None else 0
    kwargs["attention_mask"] = torch.ones(batch, past + new, dtype=torch.long, device=tokens.device)
    return args, kwargs


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------

Message = dict[str, str]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, messages: list[Message]) -> list[int]:
    """Token ids of ``messages`` followed by the assistant's turn opener, as in training.

    Without a chat template the contents are joined by newlines as plain text for the model to
    continue (a pretrained-only model).
    """
    if not has_chat_template(tokenizer):
        return list(tokenizer("\n".join(m["content"] for m in messages))["input_ids"])
    try:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)
    except Exception as err:  # jinja2's TemplateError and the template's own raise_exception
        roles = [m["role"] for m in messages]
        raise DemoError(f"the model's chat template rejected the messages with roles {roles}: {err}; "
                        f"if it takes no system message, drop --system") from err
    return list(encoded["input_ids"])


def fit_history(messages: list[Message], render: Callable[[list[Message]], list[int]],
                budget: int) -> tuple[list[Message], list[int], int]:
    """Drop the oldest exchanges (never the system message nor the last user message) until the
    rendered prompt has at most ``budget`` tokens; return the kept messages, their ids and how
    many messages were dropped."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    dropped = 0
    while True:
        ids = render(system + turns)
        if len(ids) <= budget:
            return system + turns, ids, dropped
        # the next user message after the oldest one starts the next exchange
        nxt = next((i for i, m in enumerate(turns) if i > 0 and m["role"] == "user"), None)
        if nxt is None:
            raise DemoError(f"the prompt has {len(ids)} tokens but only {budget} fit (context minus "
                            f"--max-new-tokens); shorten the message or lower --max-new-tokens")
        turns = turns[nxt:]
        dropped += nxt


# ---------------------------------------------------------------------------------------------
# Generation in lockstep
# ---------------------------------------------------------------------------------------------


def stop_token_ids(tokenizer: Any, generation_config: Any) -> list[int]:
    """The tokenizer's eos plus every eos in the generation_config (chat models list several)."""
    ids: list[int] = []
    configured = getattr(generation_config, "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    for tid in configured + [tokenizer.eos_token_id]:
        if tid is not None and tid not in ids:
            ids.append(int(tid))
    return ids


def generate_kwargs(options: SamplingOptions, *, stop_ids: list[int], pad_id: int | None) -> dict[str, Any]:
    """Arguments for ``generate``; only what the demo sets, the model's generation_config does
    the rest (repetition penalty, ...)."""
    if pad_id is None and stop_ids:
        pad_id = stop_ids[0]  # batch of one: never used for padding, only silences generate
    kwargs: dict[str, Any] = {"max_new_tokens": options.max_new_tokens, "num_beams": 1,
                              "do_sample": not options.greedy, "eos_token_id": stop_ids or None,
                              "pad_token_id": pad_id}
    if not options.greedy:
        kwargs.update(temperature=options.temperature, top_p=options.top_p)
        if options.top_k is not None:
            kwargs["top_k"] = options.top_k
    return kwargs


def generate_answer(engine: Any, prompt_ids: list[int], *, device: str, kwargs: dict[str, Any],
                    streamer: Any | None) -> list[int]:
    """Generate on every rank (same inputs, same seed); return the new token ids."""
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        out = engine.generate(input_ids=input_ids, attention_mask=attention_mask, streamer=streamer, **kwargs)
    return out[0, len(prompt_ids):].tolist()


def broadcast_text(text: str | None, ranks: Ranks) -> str:
    """Rank 0's ``text`` on every rank."""
    if ranks.world_size == 1:
        assert text is not None
        return text
    import torch.distributed as dist

    box = [text]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


def check_ranks_agree(token_ids: list[int], ranks: Ranks) -> None:
    """Fail loudly if the ranks generated different tokens (they would no longer be in lockstep)."""
    if ranks.world_size == 1:
        return
    import torch.distributed as dist

    gathered: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(gathered, token_ids)
    differing = [r for r, ids in enumerate(gathered) if ids != gathered[0]]
    if differing:
        raise RuntimeError(f"ranks {differing} generated other tokens than rank 0; the ranks must get the "
                           f"same prompt and seed (this is a bug in demo.py, please report it)")


# ---------------------------------------------------------------------------------------------
# The chat
# ---------------------------------------------------------------------------------------------


@dataclass
class Chat:
    """Everything one conversation needs; built once by ``demo.main``."""

    engine: Any
    tokenizer: Any
    ranks: Ranks
    device: str
    options: SamplingOptions
    context: int
    system: str | None = None
    record: TextIO | None = None
    """Rank 0's --output-json stream: one JSON object per turn."""
    history: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        gen_config = getattr(self.engine.module, "generation_config", None)
        self.kwargs = generate_kwargs(self.options, stop_ids=stop_token_ids(self.tokenizer, gen_config),
                                      pad_id=self.tokenizer.pad_token_id)
        self.reset()

    def say(self, text: str) -> None:
        if self.ranks.is_main:
            print(text, flush=True)

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def turn(self, user_text: str, *, label: str = "") -> str:
        """Answer ``user_text`` given the history, streaming it on rank 0 after ``label``; the
        answer joins the history."""
        messages = self.history + [{"role": "user", "content": user_text}]
        render = functools.partial(render_prompt, self.tokenizer)
        budget = self.context - self.options.max_new_tokens
        messages, prompt_ids, dropped = fit_history(messages, render, budget)
        if dropped:
            self.say(f"(history trimmed: dropped the {dropped} oldest messages to fit {self.context} tokens)")
        streamer = None
        if self.ranks.is_main:
            print(label, end="", flush=True)
            streamer = self._streamer()
        new_ids = generate_answer(self.engine, prompt_ids, device=self.device, kwargs=self.kwargs,
                                  streamer=streamer)
        check_ranks_agree(new_ids, self.ranks)
        answer = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        self.history = messages + [{"role": "assistant", "content": answer}]
        self._write_record(prompt_ids, new_ids, answer)
        return answer

    def _streamer(self) -> Any:
        from transformers import TextStreamer

        return TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)

    def _write_record(self, prompt_ids: list[int], output_ids: list[int], text: str) -> None:
        if self.record is None or not self.ranks.is_main:
            return
        prompt = self.tokenizer.decode(prompt_ids)
        self.record.write(json.dumps({"prompt": prompt, "prompt_ids": prompt_ids, "output_ids": output_ids,
                                      "text": text}, ensure_ascii=False) + "\n")
        self.record.flush()


HELP = "Commands: /reset clears the history, /exit quits (Ctrl-D too), /help shows this."


def read_user_line(ranks: Ranks) -> str:
    """Rank 0 reads a non-empty line (EOF reads as /exit); every rank gets it."""
    line: str | None = None
    if ranks.is_main:
        line = ""
        while not line:
            try:
                line = input("User: ").strip()
            except EOFError:
                print(flush=True)
                line = "/exit"
    return broadcast_text(line, ranks)


def interactive(chat: Chat) -> None:
    """Multi-turn chat until /exit or EOF; all ranks run this loop in lockstep."""
    chat.say(HELP)
    while True:
        line = read_user_line(chat.ranks)
        if line in ("/exit", "/quit"):
            return
        if line == "/help":
            chat.say(HELP)
            continue
        if line == "/reset":
            chat.reset()
            chat.say("(history cleared)")
            continue
        if line.startswith("/"):
            chat.say(f"unknown command {line!r}. {HELP}")
            continue
        try:
            chat.turn(line, label="Assistant: ")
        except DemoError as err:  # too long, or the template refused: keep chatting
            chat.say(f"error: {err}")


def warn_no_template(model_dir: str, ranks: Ranks) -> None:
    if ranks.is_main:
        warnings.warn(f"{model_dir} has no chat_template (chat_template.jinja or tokenizer_config.json): "
                      f"prompting with plain text (messages joined by newlines) instead; export the "
                      f"model with its chat template to prompt it as it was trained", stacklevel=2)
