"""What the user sees: a rank-0 progress bar (step, loss, lr, grad norm, tokens/s, samples/s,
ETA), save_path/metrics.jsonl, DeepSpeed's monitors (tensorboard/csv) and the end summary."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist
from tqdm import tqdm


class Progress:
    def __init__(self, save_path: Path, *, total: int, start: int, monitor: Any) -> None:
        self.rank0 = dist.get_rank() == 0
        self.monitor = monitor if (monitor is not None and getattr(monitor, "enabled", False)) else None
        self.metrics_path = save_path / "metrics.jsonl"
        self.started = time.time()
        self.bar = None
        if self.rank0:
            save_path.mkdir(parents=True, exist_ok=True)
            if start:
                tqdm.write(f"resuming at step {start} of {total}", file=sys.stderr)
            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr, smoothing=0.1)

    def _log(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")

    def step(self, m: dict[str, Any]) -> None:
        if not self.rank0:
            return
        self._log(m)
        gn = "-" if m["grad_norm"] is None else f"{m['grad_norm']:.3g}"
        self.bar.set_postfix_str(f"loss={m['loss']:.4f} lr={m['lr']:.3g} gnorm={gn} "
                                 f"tok/s={m['tokens_per_s']:.0f} samples/s={m['samples_per_s']:.2f}", refresh=False)
        self.bar.update(1)
        if self.monitor is not None:
            events = [("Train/Samples/lr", m["lr"], m["step"]), ("Train/Samples/tokens_per_s", m["tokens_per_s"], m["step"])]
            if m["grad_norm"] is not None:
                events.append(("Train/Samples/grad_norm", m["grad_norm"], m["step"]))
            self.monitor.write_events(events)

    def eval(self, step: int, loss: float) -> None:
        if not self.rank0:
            return
        self._log({"step": step, "eval_loss": loss})
        self.note(f"step {step}: eval loss {loss:.4f}")
        if self.monitor is not None:
            self.monitor.write_events([("Eval/Samples/eval_loss", loss, step)])

    def note(self, text: str) -> None:
        if self.rank0:
            tqdm.write(text, file=sys.stderr)

    def finish(self, summary: dict[str, Any], *, export_hint: str) -> None:
        if not self.rank0:
            return
        self.bar.close()
        minutes, seconds = divmod(int(time.time() - self.started), 60)
        last = summary["last"]
        loss = f", last loss {last['loss']:.4f}" if last else ""
        ev = f", eval loss {summary['eval_loss']:.4f}" if summary["eval_loss"] is not None else ""
        print(f"done: {summary['steps']} steps ({minutes}m{seconds:02d}s this run){loss}{ev}\n"
              f"weights: {summary['weights']}\n"
              f"export to Hugging Face format:\n  {export_hint}", flush=True)
