"""The chunked LM-head loss (stages/lib/lm_head.py) against the unchunked computation it replaces.

Loss, log-probs and every parameter's gradient on packed rows of several samples of a real tiny
transformers model (tied and untied head, SFT's token mean and REDI's per-pair weights); under
DeepSpeed ZeRO-2 and ZeRO-3 on 2 gloo ranks; the fallback for heads that are more than one
linear layer; and the peak memory of one training step at 8,192 completion tokens with Qwen2.5's
151,936-row vocabulary, measured in a subprocess (bench/train_memory.py's child mode).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# fp32: the chunked backward sums the weight gradient chunk by chunk in another order than one
# matmul does; measured differences are ~1e-6 on log-probs (values ~ -7) and ~1e-7 on gradients
# (largest ~0.15), well inside the 1e-5.
TOL = 1e-5


def _packed_batch(vocab: int, lengths=((40, 5), (90, 20), (13, 3), (70, 1), (31, 30))):
    """One packed row of several samples of unequal length and prompt length (random ids)."""
    import torch

    from stages.lib.packed import collate, packed_row

    g = torch.Generator().manual_seed(0)
    seqs = [(torch.randint(5, vocab, (n,), generator=g).tolist(), p) for n, p in lengths]
    return collate([packed_row(seqs)])


def _losses(model, batch, chunk):
    """(log-probs, SFT token-mean loss, REDI loss, gradients) of our path with `chunk`."""
    import torch

    from stages.lib.packed import completion_logps
    from stages.redi import redi_loss

    model.zero_grad()
    logps = completion_logps(model, batch, chunk)
    sft = -logps.mean()
    # REDI, as pair_logps reads a row: even samples chosen, odd ones rejected (an odd last
    # sample unpaired) — per-token weights that differ per sample, unlike SFT's single mean
    seq = batch["keep_seq"]
    sums = torch.zeros(batch["n_seqs"]).index_add(0, seq, logps)
    lens = torch.bincount(seq, minlength=batch["n_seqs"]).float()
    pairs = batch["n_seqs"] // 2
    redi = redi_loss(sums[0::2][:pairs], lens[0::2][:pairs], sums[1::2][:pairs],
                     lens[1::2][:pairs], alpha=0.8)
    (sft + redi).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), sft.item(), redi.item(), grads


def _assert_same(ours, ref):
    logps, sft, redi, grads = ours
    r_logps, r_sft, r_redi, r_grads = ref
    assert (logps - r_logps).abs().max().item() <= TOL
    assert sft == pytest.approx(r_sft, abs=TOL) and redi == pytest.approx(r_redi, abs=TOL)
    assert grads.keys() == r_grads.keys()
    for name in grads:
        assert (grads[name] - r_grads[name]).abs().max().item() <= TOL, name


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_loss_and_gradients_equal_the_unchunked_ones(tiny_model, tied):
    import torch
    from transformers import AutoModelForCausalLM

    from stages.lib.packed import ATTENTION, completion_logps_chunked, register_attention

    register_attention()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=ATTENTION,
                                                 dtype=torch.float32)
    if not tied:  # an untied head: its own weight, which must get its own gradient
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 1.5)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    batch = _packed_batch(model.config.vocab_size)
    ref = _losses(model, batch, chunk=0)
    assert "lm_head.weight" in ref[3] or tied
    for chunk in (7, 64, 1024):  # uneven chunks, several, and one chunk holding all K
        _assert_same(_losses(model, batch, chunk), ref)
    with torch.no_grad():  # scoring: the same chunk loop without autograd
        scored = completion_logps_chunked(model, batch, chunk=7)
    assert (scored - ref[0]).abs().max().item() <= TOL


def _stage_losses(model, batch, chunk):
    """(loss, gradients) of sft_loss and of redi_batch_loss as the stages call them (fused:
    they pass their per-token weights), each backward on its own."""
    from stages.lib.packed import completion_logps
    from stages.redi import CollapseWatch, redi_batch_loss
    from stages.sft import sft_loss

    def fixed_chunk(model, batch, chunk_=None, weights=None):
        return completion_logps(model, batch, chunk, weights if chunk else None)

    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("stages.sft.completion_logps", fixed_chunk)
        mp.setattr("stages.lib.packed.completion_logps", fixed_chunk)
        for name, fn in (("sft", lambda: sft_loss(model, batch)[0]),
                         ("redi", lambda: redi_batch_loss(model, batch, 0.8,
                                                          CollapseWatch(0.0))[0])):
            model.zero_grad()
            loss = fn()
            loss.backward()
            out[name] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                                       if p.grad is not None})
    return out


@pytest.mark.parametrize("tied", [True, False])
def test_fused_head_gradients_of_sft_and_redi_equal_the_unchunked_ones(tiny_model, tied):
    """sft and redi pass per-token weights, so the head's gradients are taken in the forward
    (no recompute): the same losses and gradients as the unchunked computation."""
    import torch
    from transformers import AutoModelForCausalLM

    from stages.lib import lm_head
    from stages.lib.packed import ATTENTION, register_attention

    register_attention()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=ATTENTION,
                                                 dtype=torch.float32)
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 1.5)
    batch = _packed_batch(model.config.vocab_size, lengths=((40, 5), (90, 20), (13, 3),
                                                            (70, 1), (31, 30), (25, 2)))
    ref = _stage_losses(model, batch, chunk=0)
    scales = []
    original = lm_head._grad_scale
    with pytest.MonkeyPatch.context() as mp:  # the fused gradients were used, not recomputed
        mp.setattr(lm_head, "_grad_scale", lambda g, w: scales.append(original(g, w))
                   or scales[-1])
        ours = _stage_losses(model, batch, chunk=7)
    assert len(scales) == 2 and None not in scales
    for name in ("sft", "redi"):
        assert ours[name][0] == pytest.approx(ref[name][0], abs=TOL), name
        assert ours[name][1].keys() == ref[name][1].keys()
        for p in ref[name][1]:
            diff = (ours[name][1][p] - ref[name][1][p]).abs().max().item()
            assert diff <= TOL, (name, p, diff)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    """Decoder layers recomputed in backward (non-reentrant, as train_packed turns it on) under
    the chunked head: the same loss and gradients; and "auto" turns it on above 8,192 tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from stages.lib.packed import ATTENTION, register_attention
    from stages.lib.trainer import CHECKPOINT_ABOVE, gradient_checkpointing

    register_attention()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=ATTENTION,
                                                 dtype=torch.float32).train()
    batch = _packed_batch(model.config.vocab_size)
    ref = _losses(model, batch, chunk=0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _assert_same(_losses(model, batch, chunk=7), ref)

    rows = [{"input_ids": [0] * CHECKPOINT_ABOVE}, {"input_ids": [0] * 10}]
    assert not gradient_checkpointing("auto", rows)
    assert gradient_checkpointing("auto", rows + [{"input_ids": [0] * (CHECKPOINT_ABOVE + 1)}])
    assert gradient_checkpointing(True, rows) and not gradient_checkpointing(False, rows * 9)


def test_head_with_bias_and_bf16_weights():
    """HeadLogps itself: a biased head (all three gradients) in fp32 against autograd, and a
    bf16 head against autograd's bf16 computation to bf16 precision; recomputed, fused, and
    fused with weights the loss breaks."""
    import torch
    import torch.nn.functional as F

    from stages.lib.lm_head import HeadLogps

    g = torch.Generator().manual_seed(1)
    for dtype, tol in ((torch.float32, TOL), (torch.bfloat16, 2e-2)):
        h = torch.randn(50, 32, generator=g).to(dtype).requires_grad_()
        w = torch.randn(300, 32, generator=g).mul(0.2).to(dtype).requires_grad_()
        b = torch.randn(300, generator=g).to(dtype).requires_grad_()
        t = torch.randint(0, 300, (50,), generator=g)
        coef = torch.rand(50, generator=g)
        ref = -F.cross_entropy(F.linear(h, w, b).float(), t, reduction="none")
        (ref * coef).sum().backward()
        ref_grads = [x.grad.clone() for x in (h, w, b)]
        for x in (h, w, b):
            x.grad = None
        # recompute; fused with the loss's own weights (scaled: c = -3); fused with weights the
        # loss does not follow (all equal), which backward must notice and recompute
        for weights in (None, coef * -3, torch.ones(50)):
            for x in (h, w, b):
                x.grad = None
            ours = HeadLogps.apply(h, w, b, t, 16, weights)
            (ours * coef).sum().backward()
            assert (ours - ref).abs().max().item() <= tol
            for x, r in zip((h, w, b), ref_grads):
                assert x.grad.dtype == dtype
                assert (x.grad.float() - r.float()).abs().max().item() <= \
                    tol * max(1, r.abs().max())


def test_soft_capped_logits_fall_back_with_a_warning(caplog):
    """Gemma-2's final-logit soft-capping is more than a linear head: unchunked, warned once."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from stages.lib.packed import ATTENTION, register_attention

    register_attention()
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=500, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                          head_dim=32, final_logit_softcapping=30.0)
    config._attn_implementation = ATTENTION
    model = Gemma2ForCausalLM(config)
    batch = _packed_batch(500, lengths=((30, 4), (20, 2)))
    ref = _losses(model, batch, chunk=0)
    with caplog.at_level(logging.WARNING, logger="stages.lib.lm_head"):
        _assert_same(_losses(model, batch, chunk=7), ref)
    assert "final_logit_softcapping" in caplog.text


def test_logits_changed_after_the_head_are_detected(tiny_model, caplog):
    """A model that transforms the logits after its head, with no config key saying so, is
    caught by the output check (its logits are not the tensor the head returned)."""
    from transformers import AutoModelForCausalLM

    from stages.lib.packed import ATTENTION, register_attention

    register_attention()
    base = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=ATTENTION)

    class Scaled(type(base)):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    model = Scaled.from_pretrained(tiny_model, attn_implementation=ATTENTION)
    batch = _packed_batch(model.config.vocab_size, lengths=((30, 4), (20, 2)))
    ref = _losses(model, batch, chunk=0)
    with caplog.at_level(logging.WARNING, logger="stages.lib.lm_head"):
        _assert_same(_losses(model, batch, chunk=7), ref)
    assert "transforms the LM head's output" in caplog.text


# --- ZeRO-2 / ZeRO-3 on 2 gloo ranks -------------------------------------------------------------

def _zero_rank(rank: int, world: int, port: int, model_path: str, out: str) -> None:
    """One rank: for each ZeRO stage, a DeepSpeed engine around the tiny model; the unchunked, the
    chunked and the fused chunked loss (the head's gradients taken in the forward, while ZeRO-3's
    hooks have its weight gathered) through the engine, backward, the full gradients (rank 0
    saves them)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed
    import torch
    from deepspeed.utils import safe_get_full_grad
    from transformers import AutoConfig, AutoModelForCausalLM

    from stages.lib.packed import ATTENTION, completion_logps, register_attention

    torch.set_num_threads(1)
    register_attention()
    deepspeed.init_distributed(dist_backend="gloo")
    batch = _packed_batch(AutoConfig.from_pretrained(model_path).vocab_size)
    results = {}
    for stage in (2, 3):
        model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation=ATTENTION,
                                                     dtype=torch.float32)
        names = {id(p): n for n, p in model.named_parameters()}
        ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_force_ds_cpu_optimizer": False,
              "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(
            model=model, config=ds,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.0))  # lr 0: weights stay put
        head = engine.module.lm_head.weight
        if stage == 3:  # partitioned: only the hooks of a module's call can gather it
            assert head.numel() == 0 and head.ds_shape[0] == model.config.vocab_size
        for chunk in (0, 7, "7 fused"):
            weights = torch.full(batch["targets"].shape, -1.0) if chunk == "7 fused" else None
            logps = completion_logps(engine, batch, 7 if weights is not None else chunk,
                                     weights=weights)
            loss = -logps.mean()
            engine.backward(loss)
            grads = {names[id(p)]: safe_get_full_grad(p).clone()
                     for p in engine.module.parameters()}
            engine.step()
            results[f"{stage}/{chunk}"] = {"loss": loss.item(), "logps": logps.detach(),
                                           "grads": grads}
        del engine
    from stages.lib import lm_head

    # the chunked head ran under both stages: nothing fell back to the unchunked computation
    results["fell_back"] = sorted(c.__name__ for c in lm_head._post_processing)
    if rank == 0:
        torch.save(results, out)


def test_chunked_loss_under_zero2_and_zero3_on_two_gloo_ranks(tiny_model, tmp_path):
    import socket

    import torch
    from transformers import AutoModelForCausalLM

    from stages.lib.packed import ATTENTION, completion_logps, register_attention

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "zero.pt")
    code = ("import sys, torch.multiprocessing as mp; sys.path[:0] = [sys.argv[1], sys.argv[2]]; "
            "from test_lm_head import _zero_rank; "
            "mp.spawn(_zero_rank, args=(2, int(sys.argv[3]), sys.argv[4], sys.argv[5]), nprocs=2)")
    subprocess.run([sys.executable, "-c", code, ROOT, os.path.join(ROOT, "tests"), str(port),
                    tiny_model, out], check=True, timeout=300, cwd=ROOT)
    results = torch.load(out)
    assert results.pop("fell_back") == []

    register_attention()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=ATTENTION,
                                                 dtype=torch.float32)
    batch = _packed_batch(model.config.vocab_size)
    ref = completion_logps(model, batch, 0)
    (-ref.mean()).backward()
    for key, r in results.items():
        assert r["loss"] == pytest.approx(-ref.mean().item(), abs=TOL), key
        assert (r["logps"] - ref.detach()).abs().max().item() <= TOL, key
        for name, p in model.named_parameters():
            diff = (r["grads"][name].view_as(p) - p.grad).abs().max().item()
            assert diff <= TOL, (key, name, diff)


# --- memory at a real vocabulary ---------------------------------------------------------------

# One step (loss + backward) of the 2-layer, hidden-256 model with Qwen2.5's 151,936-row
# vocabulary on one packed row of 8,192 completion tokens, in its own process. Unchunked it
# peaks at ~15 GB (three fp32 copies of the 5.0 GB logits); chunked, one chunk's [1,024 x
# 151,936] fp32 logits (0.62 GB, x ~2 in the log-sum-exp and its recompute) beside the model
# (0.16 GB of tied embeddings + its fp32 gradient), the activations and torch itself: measured
# ~2.2 GB (docs/performance.md). The bound is a quarter of the unchunked peak.
PEAK_BOUND_MB_AT_8K = 3800


def test_peak_memory_at_8k_tokens_and_a_real_vocabulary(tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "train_memory.py"), "--child", "chunked",
         "--tokens", "8192", "--model-dir", str(tmp_path / "model"), "--steps", "0"],
        check=True, capture_output=True, text=True, timeout=600, cwd=ROOT)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["peak_rss_mb"] < PEAK_BOUND_MB_AT_8K, result
    assert result["completion_tokens"] == 8192 and result["vocab"] == 151936


# --- the stages end to end at a real vocabulary -------------------------------------------------

def test_sft_then_redi_train_at_a_real_vocabulary(tmp_path, ray_cluster):
    """sft (2 gloo workers, ZeRO-2, gradient checkpointing forced on) and then redi from its
    checkpoint (ZeRO-3: the partitioned LM head gathered by its hooks) on the 2-layer model with
    Qwen2.5's 151,936-row vocabulary, two steps each."""
    from test_sft import RECIPE, load_weights, sft_overrides, write_select

    from pipeline.config import load_recipe
    from pipeline.runner import run_stage
    from pipeline.apps.tiny_model import build_tiny_model
    from stages import STAGES

    model = build_tiny_model(str(tmp_path / "model"), layers=2, vocab_to=151936)
    data_root = str(tmp_path / "data")
    write_select(data_root, n=16)
    sft = run_stage("sft", load_recipe(RECIPE, sft_overrides(data_root, model) + [
        "sft.max_steps=2", "sft.report_to=none", "resources.sft.gradient_checkpointing=true"],
        STAGES))
    stats = sft.manifest["stats"]
    assert stats["steps"] == 2 and stats["gradient_checkpointing"] is True
    # a random-init model over 151,936 rows starts near log(151,936) = 11.9 nats a token
    assert all(0 < loss < 13 for loss in stats["loss"])
    redi = run_stage("redi", load_recipe(RECIPE, [
        f"data_root={data_root}", "redi.pairs_per_step=4", "redi.max_length=512",
        "redi.max_steps=2", "redi.save_steps=0", "redi.report_to=none",
        "redi.learning_rate=0.0001",
        "resources.redi.zero_stage=3"], STAGES))
    stats = redi.manifest["stats"]
    assert stats["steps"] == 2 and stats["zero_stage"] == 3
    assert stats["gradient_checkpointing"] is False  # "auto": these rows are far below 8,192
    assert all(-13 < v < 0 for v in stats["logps_chosen"] + stats["logps_rejected"])
    before, after = load_weights(sft.path), load_weights(redi.path)
    # the ZeRO-3 save writes the tied head once (as the embedding), the ZeRO-2 one both names
    shared = before.keys() & after.keys()
    assert "model.embed_tokens.weight" in shared
    assert any(not (before[k] == after[k]).all() for k in shared)
