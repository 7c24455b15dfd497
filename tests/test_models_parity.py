"""Our pipeline layers, run in sequence in one process, against transformers' own classes:
same logits, loss and gradients (fp32), on padded and packed batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import VARIANTS, VOCAB, save_hf_model

import models.common
from models.common import IGNORE_INDEX, token_loss_sum
from models.convert import hg_to_pp
from models.names import NameMap
from models.spec import BuildOptions
from models.stack import LayerStack


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(name, HF model, pipeline dir converted from it by the production code)."""
    root = tmp_path_factory.mktemp(request.param)
    hf = save_hf_model(request.param, root / "hf")
    pp = hg_to_pp(str(root / "hf"), str(root / "pp"), progress=False)
    return request.param, hf, pp


def padded_batch(seed: int = 1, t: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows; the second right-padded after 8 tokens. t > the test sliding windows (5, 6)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (2, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return ids, mask


def shifted_targets(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """HF's label convention (labels = ids on real tokens), shifted as our data module does."""
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def test_logits_match_transformers(pair) -> None:
    name, hf, pp = pair
    ours = LayerStack.from_pipeline_dir(pp).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits
        mine = ours.logits(ids, segment_ids=mask)
    real = mask.bool()
    torch.testing.assert_close(mine[real], theirs[real], rtol=1e-5, atol=1e-5)
    assert theirs[real].std() > 0.1  # the comparison is not between two constant outputs


def test_loss_and_gradients_match_transformers(pair) -> None:
    name, hf, pp = pair
    ours = LayerStack.from_pipeline_dir(pp).train()
    hf.train()
    ids, mask = padded_batch(seed=2)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    hf.zero_grad()
    hf_loss = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
    hf_loss.backward()

    targets = shifted_targets(ids, mask)
    logits, kept = ours(ids, torch.arange(ids.shape[1]).expand_as(ids), mask, targets)
    loss = token_loss_sum(logits, kept) / kept.numel()
    loss.backward()
    torch.testing.assert_close(loss, hf_loss, rtol=1e-5, atol=1e-6)
    _assert_grads_match(ours, hf)


def _assert_grads_match(ours: LayerStack, hf: torch.nn.Module) -> None:
    names = NameMap(ours.spec)
    hf_params = dict(hf.named_parameters())
    checked = 0
    for slot, module in ours.pairs():
        if slot.kind == "tied_head":
            continue
        for local, param in module.named_parameters():
            hf_name = names.to_hf(slot.layer, local)
            torch.testing.assert_close(param.grad, hf_params[hf_name].grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, n=hf_name: f"{n}: {m}")
            checked += 1
    assert checked == len(hf_params)  # every HF parameter (a tied one once) was compared


def test_packed_row_equals_samples_run_alone(pair) -> None:
    """Two samples packed in one row (positions restart, attention kept apart) give the same
    per-sample losses as each sample alone."""
    name, _, pp = pair
    ours = LayerStack.from_pipeline_dir(pp, BuildOptions(packed=True)).eval()
    alone = LayerStack.from_pipeline_dir(pp).eval()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(4, VOCAB, (7,), generator=g), torch.randint(4, VOCAB, (9,), generator=g)
    ta, tb = F.pad(a[1:], (0, 1), value=IGNORE_INDEX), F.pad(b[1:], (0, 1), value=IGNORE_INDEX)
    ids = torch.cat([a, b])[None]
    pos = torch.cat([torch.arange(7), torch.arange(9)])[None]
    seg = torch.cat([torch.full((7,), 1), torch.full((9,), 2)])[None]
    with torch.no_grad():
        logits = ours.logits(ids, pos, seg)[0]
        packed_a = F.cross_entropy(logits[:6], ta[:6])
        packed_b = F.cross_entropy(logits[7:15], tb[:8])
        solo_a = F.cross_entropy(alone.logits(a[None])[0][:6], ta[:6])
        solo_b = F.cross_entropy(alone.logits(b[None])[0][:8], tb[:8])
    torch.testing.assert_close(packed_a, solo_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed_b, solo_b, rtol=1e-5, atol=1e-6)


def test_grad_checkpointing_leaves_gradients_unchanged(pair) -> None:
    name, _, pp = pair
    grads = []
    for ckpt in (False, True):
        stack = LayerStack.from_pipeline_dir(pp, BuildOptions(grad_ckpt=ckpt)).train()
        ids, mask = padded_batch(seed=4)
        logits, kept = stack(ids, torch.arange(ids.shape[1]).expand_as(ids), mask, shifted_targets(ids, mask))
        (token_loss_sum(logits, kept) / kept.numel()).backward()
        grads.append({n: p.grad.clone() for n, p in stack.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=0)


def test_head_projects_only_trained_positions(tmp_path: Path) -> None:
    """Training logits exist only where a target is trained ([n, V], not [B, T, V])."""
    save_hf_model("llama", tmp_path / "hf")
    stack = LayerStack.from_pipeline_dir(hg_to_pp(str(tmp_path / "hf"), str(tmp_path / "pp"), progress=False))
    ids, mask = padded_batch()
    targets = shifted_targets(ids, mask)
    targets[0, :5] = IGNORE_INDEX
    logits, kept = stack(ids, torch.arange(12).expand_as(ids), mask, targets)
    n = int((targets != IGNORE_INDEX).sum())
    assert logits.shape == (n, VOCAB) and kept.shape == (n,)
    torch.testing.assert_close(logits, stack.logits(ids, segment_ids=mask)[targets != IGNORE_INDEX])


@pytest.mark.parametrize("name", ["llama", "llama_tied"])
def test_a_stage_reads_only_its_own_layer_files(name: str, tmp_path: Path) -> None:
    """What each pipeline rank does: fill its stage's modules from the pipeline dir. The last
    stage of a 4-layer model (layers 2-3, and the tied embedding for a tied head) loads with every
    other layer file gone."""
    from models.pipedir import layer_file
    from models.stack import fill_from_dir

    save_hf_model(name, tmp_path / "hf")
    pp = hg_to_pp(str(tmp_path / "hf"), str(tmp_path / "pp"), progress=False)
    reference = LayerStack.from_pipeline_dir(pp)
    last_stage = [(s, m) for s, m in LayerStack(reference.spec).pairs() if s.layer >= 2]
    (pp / layer_file(1)).unlink()
    if not reference.spec.tied:
        (pp / layer_file(0)).unlink()  # the untied last stage needs nothing from the embedding
    fill_from_dir(pp, last_stage)
    for (slot, mine), (_, theirs) in zip(last_stage, [p for p in reference.pairs() if p[0].layer >= 2]):
        for (n, a), (_, b) in zip(mine.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b), f"{slot.kind}.{n}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_equals_the_one_liner(monkeypatch: pytest.MonkeyPatch,
                                                    dtype: torch.dtype) -> None:
    monkeypatch.setattr(models.common, "CE_CHUNK_ELEMENTS", 64)  # 2 rows per chunk, below the logits' size
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 32, generator=g).to(dtype).requires_grad_()
    targets = torch.randint(0, 32, (7,), generator=g)
    targets[3] = models.common.IGNORE_INDEX
    ours = models.common.token_loss_sum(logits, targets)
    (g_ours,) = torch.autograd.grad(ours * 0.3, logits)
    ref = F.cross_entropy(logits.float(), targets, reduction="sum")
    (g_ref,) = torch.autograd.grad(ref * 0.3, logits)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    assert g_ours.dtype == dtype and (g_ours[3] == 0).all()
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)
