"""``contrastive_pool=global`` (gradient caching): every trainable gradient equals ONE process holding the whole batch.

Reference: one plain model (no DeepSpeed) forwards all ``W*A*B`` rows at once; L_SR and L_SSC run every row against
all rows, L_VCC is the mean over the rows and L_LM the mean of the micro-batches' own L_LM (its per-micro-batch
semantics are kept). Grad-cache: ``W`` ranks x ``A`` accumulated micro-batches of ``B`` rows, DeepSpeed ZeRO-2 and
ZeRO-3 (gloo, spawn, no Ray). Dropout and randomized positions are off for the comparison (one big forward draws
other masks than A*W small ones); a separate test keeps them on and checks the seed replay. Same-user and
duplicate-target false negatives are planted ACROSS micro-batches and ranks so the masks of the global pool count.

Tolerance: fp32, ``|g - g_ref| <= 1e-5 + 1e-4 * |g_ref|`` per element (summation order and padding widths differ;
the largest absolute difference measured was 1.5e-5, W=1 A=3, printed by the tests).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from _align_fakes import NV, fake_batch, text_encoder  # noqa: E402

from lsvcr_dist.losses import AlignmentLoss  # noqa: E402
from lsvcr_dist.train.align_step import micro_step, seed_micro_step, text_inputs, to_tensors  # noqa: E402
from lsvcr_dist.train.grad_cache import Micro, grad_cache_step, pool_gradients  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
B, A = 2, 3  # rows per micro-batch, micro-batches per step and rank
EXACT = ["sr.dropout=0", "lora.dropout=0", "rand_pos=false"]
RTOL, ATOL = 1e-4, 1e-5


def _cfg(world: int, *overrides: str):
    from lsvcr_dist.config import load_config

    return load_config(ROOT / "jobs/configs/tiny.yaml", "align", [
        f"global_batch={world * A * B}", f"deepspeed.micro_batch={B}", f"scaling.num_workers={world}",
        "run_dir=/nonexistent", "contrastive_pool=global", *overrides])


def _raws(world: int) -> list[list[dict]]:
    """``[rank][micro]`` fake micro-batches; a user and a target text shared across micro-batches and ranks."""
    raws = [[fake_batch(B, seed=10 * r + j + 1) for j in range(A)] for r in range(world)]
    last = raws[-1][-1]
    last["user_id"][0] = raws[0][0]["user_id"][1]  # same user: a false negative in another micro-batch
    last["target_text_id"][1] = raws[0][1]["target_text_id"][1]  # same target text (same task parity: row 1)
    last["target_comment"][1] = raws[0][1]["target_comment"][1]
    return raws


def _trainable_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def big_batch_grads(cfg, world: int) -> dict[str, torch.Tensor]:
    """Gradients of the whole ``world * A * B`` batch in ONE process (the exactness reference)."""
    encode, model, loss_fn = _model(cfg)
    flat = [m for rank_raws in _raws(world) for m in rank_raws]  # pool order: rank-major, then micro-step
    big = {k: np.concatenate([m[k] for m in flat]) for k in flat[0]}
    bt = to_tensors(big, "cpu")
    out = model(bt, text_inputs(big, NV, encode, "cpu"), rand_pos=False)
    lms = []
    for m in flat:  # L_LM keeps its per-micro-batch mean (token-weighted inside each micro-batch)
        t = to_tensors(m, "cpu")
        lms.append(model.llm(prompt_input_ids=t["prompt_input_ids"], prompt_attention_mask=t["prompt_attention_mask"],
                             prompt_labels=t["prompt_labels"], prompt_last_index=t["prompt_last_index"])[0])
    keys, users = bt["target_text_id"], bt["user_id"]
    loss, metrics = loss_fn(loss_lm=torch.stack(lms).mean(), s=out["s"], s_cross=out["s_cross"],
                            s_tilde=out["s_tilde"], e_all=out["e"], s_all=out["s"], s_tilde_all=out["s_tilde"],
                            pos_index=torch.arange(len(keys)), keys=keys, keys_all=keys, users=users, users_all=users)
    assert metrics["masked_sr"] >= 2 and metrics["masked_ssc"] >= 4  # the planted cross-micro false negatives
    loss.backward()
    return _trainable_grads(model)


def _assert_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], what: str) -> float:
    assert set(got) == set(ref) and len(ref) > 0, what
    worst = 0.0
    for name, g in ref.items():
        assert float(g.abs().sum()) > 0, f"{name}: no gradient in the reference"
        torch.testing.assert_close(got[name].reshape(g.shape), g, rtol=RTOL, atol=ATOL, msg=f"{what}: {name}")
        worst = max(worst, float((got[name].reshape(g.shape) - g).abs().max()))
    return worst


class FakeEngine:
    """What ``grad_cache_step`` / ``micro_step`` use of a DeepSpeed engine, with its 1/A accumulation scaling."""

    def __init__(self, module: torch.nn.Module, accum: int) -> None:
        self.module, self.accum = module, accum

    def __call__(self, *args):
        return self.module(*args)

    def gradient_accumulation_steps(self) -> int:
        return self.accum

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> None:
        pass


def _model(cfg):
    """Tokenizer encode fn, the tiny ``AlignModel`` with non-zero LoRA B (so lora_A gets a gradient too), loss."""
    from lsvcr_dist.models.align_model import build_align_model

    tok, model = build_align_model(cfg, NV)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return text_encoder(tok), model, AlignmentLoss.from_config(cfg.loss)


def _micro(raws: list[dict], encode, first_index: int = 0) -> list[Micro]:
    return [Micro(first_index + j, to_tensors(r, "cpu"), text_inputs(r, NV, encode, "cpu")) for j, r in enumerate(raws)]


def test_one_process_accumulation_equals_big_batch():
    """W=1, A=3: the grad-cache gradient of every trainable parameter equals the 6-row batch's."""
    cfg = _cfg(1, *EXACT)
    encode, model, loss_fn = _model(cfg)
    metrics = grad_cache_step(FakeEngine(model, A), loss_fn, _micro(_raws(1)[0], encode), cfg.seed, False)
    assert [m["pool_size"] for m in metrics] == [A * B] * A
    assert sum(m["masked_sr"] for m in metrics) >= 2  # the duplicate target / same user across micro-batches
    worst = _assert_close(_trainable_grads(model), big_batch_grads(cfg, 1), "W=1 A=3")
    print(f"W=1 A=3 (no DeepSpeed): max |g - g_ref| = {worst:.2e}")


def test_seed_replay_keeps_dropout_and_positions():
    """Dropout and randomized positions ON, A=W=1 (global pool == micro pool): grad-cache == the plain step, which
    needs the second forward to redraw pass 1's masks; a different seed really draws other masks."""
    cfg = _cfg(1, "global_batch=4", "deepspeed.micro_batch=4", "sr.dropout=0.3", "lora.dropout=0.3")
    raw = fake_batch(4, seed=7)
    encode, model, loss_fn = _model(cfg)
    seed_micro_step(cfg.seed, 0, 5)
    micro_step(FakeEngine(model, 1), loss_fn, to_tensors(raw, "cpu"), text_inputs(raw, NV, encode, "cpu"), True)
    plain = _trainable_grads(model)
    model.zero_grad()
    grad_cache_step(FakeEngine(model, 1), loss_fn, _micro([raw], encode, first_index=5), cfg.seed, True)
    _assert_close(_trainable_grads(model), plain, "replay")
    mi = _micro([raw], encode)[0]
    with torch.no_grad():
        s = [(seed_micro_step(cfg.seed, 0, i), model(mi.batch, mi.text, True)["s"])[1] for i in (5, 6)]
    assert not torch.allclose(s[0], s[1]), "dropout / positions inactive: the replay test would prove nothing"


def test_pool_gradients_by_hand():
    """N=2, d=2, tau=1, lam=1, mu=0: L_SR = mean_i CE(cos(s_i, e_j)) with s = e = I, so each row's logits are
    (1, 0) for its own target: loss = ln(1 + e^-1); d/ds_00 ... checked by autograd of the written-out formula."""
    loss_fn = AlignmentLoss(tau=1.0, lam=1.0, mu=0.0)
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    e = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    pools = {"s": s, "s_tilde": s.clone(), "e": e}
    no_id = torch.zeros(2, dtype=torch.long)
    grads, m = pool_gradients(loss_fn, pools, no_id, no_id)
    assert m["loss_sr"] == pytest.approx(float(np.log(1 + np.exp(-1.0))))
    assert m["acc_sr"] == 1.0 and m["masked_sr"] == 0.0
    # duplicate target ids 5, 5: each row's other column is masked -> loss 0, 2 masked entries, zero gradient
    grads_d, m_d = pool_gradients(loss_fn, pools, torch.tensor([5, 5]), no_id)
    assert m_d["loss_sr"] == pytest.approx(0.0, abs=1e-7) and m_d["masked_sr"] == 2.0
    assert float(grads_d["e"].abs().max()) < 1e-7
    # the same by autograd of the written-out formula
    sl, el = s.clone().requires_grad_(), e.clone().requires_grad_()
    logits = torch.nn.functional.normalize(sl, dim=-1) @ torch.nn.functional.normalize(el, dim=-1).T
    torch.nn.functional.cross_entropy(logits, torch.arange(2)).backward()
    torch.testing.assert_close(grads["s"], sl.grad)
    torch.testing.assert_close(grads["e"], el.grad)
    assert float(grads["s_tilde"].abs().max()) == 0.0  # mu = 0: L_SSC does not count


# ------------------------------------------------------------------------------------------------ DeepSpeed, W ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ds_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from deepspeed.utils import safe_get_full_grad

    from lsvcr_dist.train.engine import initialize_engine

    result = {}
    for stage in (2, 3):
        cfg = _cfg(world, *EXACT, f"deepspeed.zero_stage={stage}")
        encode, model, loss_fn = _model(cfg)
        engine, ds = initialize_engine(model, cfg, world, "cpu", total_steps=1)
        assert ds["gradient_accumulation_steps"] == A
        got: dict[str, torch.Tensor] = {}
        real_step = engine.step

        def step(engine=engine, got=got, real_step=real_step):
            if engine.is_gradient_accumulation_boundary():  # reduced, averaged, not yet clipped or applied
                for n, p in engine.module.named_parameters():
                    if p.requires_grad:
                        got[n] = safe_get_full_grad(p).detach().clone()
            real_step()

        engine.step = step
        grad_cache_step(engine, loss_fn, _micro(_raws(world)[rank], encode), cfg.seed, False)
        if rank == 0:
            ref = big_batch_grads(cfg, world)
            result[f"zero{stage}"] = _assert_close(got, ref, f"W={world} ZeRO-{stage}")
            print(f"W={world} ZeRO-{stage}: max |g - g_ref| = {result[f'zero{stage}']:.2e}", flush=True)
    if rank == 0:
        Path(out_dir, "ok.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.timeout(400)
@pytest.mark.parametrize("world", [1, 2])
def test_deepspeed_zero2_zero3_equal_big_batch(world, tmp_path):
    """W ranks x A=3 micro-batches under ZeRO-2 and ZeRO-3: reduced gradients == the one-process big batch."""
    mp.spawn(_ds_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    worst = json.loads((tmp_path / "ok.json").read_text())
    assert set(worst) == {"zero2", "zero3"}


def test_pool_size_and_config_choice():
    """``metrics.jsonl``'s ``pool_size``: the global batch under ``global``, micro batch x workers under ``micro``;
    an unknown mode is refused naming the key."""
    from lsvcr_dist.config import ConfigError
    from lsvcr_dist.train.loop import pool_size

    cfg = _cfg(2)  # global_batch 12 = 2 workers x 3 micro-steps x 2 rows
    assert pool_size(cfg, 2) == 12
    assert pool_size(_cfg(2, "contrastive_pool=micro"), 2) == 4
    with pytest.raises(ConfigError, match="contrastive_pool.*must be one of micro, global"):
        _cfg(2, "contrastive_pool=all")
