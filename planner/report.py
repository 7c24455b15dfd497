"""The plan as text: a per-stage table, the parts list to paste, and what to change."""

from __future__ import annotations

from planner.memory import GIB

COLUMNS = ("weights", "grads", "optimizer", "activations", "step")
HEADER = ("stage", "layers", "params", "weights", "grads", "optim", "acts", "step", "total", "fits")


def _g(value: int) -> str:
    return f"{value / GIB:.2f}"


def _billions(value: int) -> str:
    return f"{value / 1e9:.2f}B" if value >= 10**8 else f"{value / 1e6:.1f}M"


def compact(parts: list[int]) -> str:
    """[2, 1, 1, 1, 1, 2] -> '[2, 1 x4, 2]' for long lists (the full list is in the parts line)."""
    if len(parts) <= 16:
        return str(parts)
    runs: list[list[int]] = []
    for p in parts:
        if runs and runs[-1][0] == p:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    return "[" + ", ".join(f"{p} x{n}" if n > 1 else str(p) for p, n in runs) + "]"


def stage_table(summary: dict, *, offload: bool) -> list[str]:
    header = HEADER + (("host",) if offload else ())
    rows = [header]
    for st in summary["stages"]:
        row = (str(st["stage"]), st["label"], _billions(st["params"]), *(_g(st[c]) for c in COLUMNS),
               _g(st["total"]), "yes" if st["fits"] else "NO")
        rows.append(row + ((_g(st["cpu"]),) if offload else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 1 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    return lines


def render(plan: dict) -> str:
    opt, model = plan["options"], plan["model"]
    tied = " (tied embeddings: the last stage keeps a copy)" if model["tied"] else ""
    ckpt = "on" if opt["grad_ckpt"] else "off"
    out = [
        f"{model['model_type']}: {model['blocks']} blocks -> {model['layers']} pipeline layers, "
        f"{_billions(model['params'])} parameters{tied}",
        f"{opt['dtype']}, {opt['optimizer']} via {plan['optimizer_path']}, seq {opt['seq_len']} x micro-batch "
        f"{opt['micro_batch']}, grad ckpt {ckpt}, overhead {opt['overhead_gib']:g} GiB/GPU",
        f"{plan['gpus']} GPUs x {plan['gpu_mem'] / GIB:g} GiB -> pipe {plan['pipe']} x data {plan['data']}"
        f" ({'your parts' if plan['parts_given'] else 'suggested parts'})",
        "",
        *stage_table(plan, offload=opt["offload"]),
        "GiB; total = overhead + weights + grads + optim + max(acts, p2p buffers + step); acts = 1F1B peak",
        "",
        f"parts: {plan['parts']}    (model_topo.parts; process_topology dims [{plan['pipe']}, {plan['data']}])",
    ]
    if opt["offload"]:
        nodes = ", ".join(_g(n) for n in plan["host_per_node"])
        out.append(f"host memory for the offloaded optimizer per node of {opt['gpus_per_node']} GPUs (GiB): {nodes}")
    out += _verdict(plan)
    return "\n".join(out) + "\n"


def _verdict(plan: dict) -> list[str]:
    cap = plan["gpu_mem"]
    worst = f"stage {plan['peak_stage']} peaks at {_g(plan['peak'])} of {_g(cap)} GiB"
    lines = [f"fits: {'yes' if plan['fits'] else 'NO'} ({worst})"]
    if "suggested" in plan and plan["suggested"]["parts"] == plan["parts"]:
        lines.append("suggested split: the same")
    elif "suggested" in plan:
        sug = plan["suggested"]
        lines.append(f"suggested instead: parts {compact(sug['parts'])} (peak {_g(sug['peak'])} GiB on stage "
                     f"{sug['peak_stage']}, fits: {'yes' if sug['fits'] else 'NO'})")
    lines.append(_fewest_line("fewest GPUs that fit these settings", plan["fewest"]))
    if plan["alternatives"]:
        lines.append(f"one change at a time, on {plan['gpus']} GPUs:")
        for alt in plan["alternatives"]:
            where = f"pipe {alt['pipe']} x data {alt['data']}, parts {compact(alt['parts'])}, "
            verdict = (f"fits ({where}peak {_g(alt['peak'])} GiB)" if alt["fits_on_given"]
                       else f"does not fit (peak {_g(alt['peak'])} GiB)")
            lines.append(f"  {alt['change']:<18} {verdict}; {_fewest_line('fewest GPUs', alt['fewest'])}")
    return lines


def _fewest_line(what: str, fewest: dict | None) -> str:
    if fewest is None:
        return f"{what}: none (no pipeline depth fits these settings)"
    return f"{what}: {fewest['gpus']} (pipe {fewest['pipe']} x data {fewest['data']}, parts {compact(fewest['parts'])})"
