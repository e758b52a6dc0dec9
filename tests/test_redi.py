"""REDI stage: the loss against a direct computation of the formula, α=0 against the SFT loss,
then real runs on Ray Train + DeepSpeed ZeRO-2 (2 gloo workers, tiny model): REDI, and the TRL
DPO and SimPO baselines on the same pairs.

The inputs are written through the real store: a select-shaped version (tests/test_sft.py's
write_select) and an `sft` version holding the tiny model's checkpoint folder.
"""
from __future__ import annotations

import os
import shutil

import pytest

from test_sft import RECIPE, load_weights, write_select
from stages import STAGES


def write_sft_version(data_root: str, model_path: str, version: str = "test000sft00"):
    """An `sft` version whose folder is `model_path`'s checkpoint (what REDI starts from)."""
    from pipeline.store import Store

    store = Store(data_root)
    out = store.begin("sft", version, clear=True)
    for name in os.listdir(model_path):
        shutil.copy(os.path.join(model_path, name), out)
    return store.commit("sft", version, {"stage": "sft", "version": version, "output": "model",
                                         "inputs": {}, "drops": {}, "splits": [],
                                         "finished_at": "2026-11-23T00:00:00+00:00"})


PAIRS = [(12, 7, 1, 3), (400, 99, 5, 1), (3, 3, 2, 6)]  # a, b, chosen steps, rejected steps


def fixed_pairs(tokenizer):
    """[(prompt_ids, chosen_ids, rejected_ids)] for three fixed problems."""
    from test_sft import _trace

    from stages.lib.packed import encode

    from stages.lib.chat import target_format

    fmt = target_format(tokenizer, "tiny", "", "chat", "think", "redi.student")
    out = []
    for a, b, good_steps, bad_steps in PAIRS:
        prompt = [{"role": "user", "content": f"Compute {a} + {b}."}]
        p, c = encode(tokenizer, prompt, _trace(a, b, good_steps, a + b), fmt)
        _, r = encode(tokenizer, prompt, _trace(a, b, bad_steps, a + b + 4), fmt)
        out.append((p, c, r))
    return out


@pytest.fixture(scope="module")
def models(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.lib.packed import ATTENTION, register_attention

    register_attention()
    return (AutoTokenizer.from_pretrained(tiny_model),
            AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=ATTENTION),
            AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa"))


def packed_redi(model, pairs, alpha):
    """Our path: all chosen and rejected traces in one packed row, one forward pass."""
    import torch

    from stages.redi import pair_logps, redi_loss
    from stages.lib.packed import collate, packed_row

    seqs = [s for p, c, r in pairs for s in ((p + c, len(p)), (p + r, len(p)))]
    with torch.no_grad():
        return redi_loss(*pair_logps(model, collate([packed_row(seqs)])), alpha).item()


def direct_logp(model, prompt, completion) -> float:
    """log π(y|x) by stock transformers on the one sequence: summed completion log-probs."""
    import torch

    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logps = model(input_ids=ids).logits[0].double().log_softmax(-1)
    return sum(logps[len(prompt) - 1 + i, t].item() for i, t in enumerate(completion))


def test_redi_loss_is_the_formula():
    import torch

    from stages.redi import redi_loss

    c, lc = torch.tensor([-12.0, -30.5, -4.25]), torch.tensor([6.0, 10.0, 2.0])
    r, lr = torch.tensor([-20.0, -9.0, -7.5]), torch.tensor([5.0, 3.0, 5.0])
    expected = sum(-c[i] / lc[i] + 0.8 * r[i] / lr[i] for i in range(3)) / 3
    assert redi_loss(c, lc, r, lr, 0.8).item() == pytest.approx(expected.item(), abs=1e-6)


def test_redi_loss_on_a_fixed_batch_equals_the_formula_computed_directly(models):
    tok, ours, stock = models
    pairs = fixed_pairs(tok)
    direct = sum(-direct_logp(stock, p, c) / len(c) + 0.8 * direct_logp(stock, p, r) / len(r)
                 for p, c, r in pairs) / len(pairs)
    assert packed_redi(ours, pairs, 0.8) == pytest.approx(direct, abs=1e-5)


def test_alpha_zero_equals_the_sft_loss_on_the_positives(models):
    import torch

    from stages.lib.packed import collate, packed_row
    from stages.sft import sft_loss

    tok, ours, _ = models
    pairs = fixed_pairs(tok)
    with torch.no_grad():
        sft_each = [sft_loss(ours, collate([packed_row([(p + c, len(p))])]))[0].item()
                    for p, c, _ in pairs]
    # one pair: REDI(α=0) is exactly SFT on its positive
    assert packed_redi(ours, pairs[:1], 0.0) == pytest.approx(sft_each[0], abs=1e-5)
    # a batch: the mean over pairs of each positive's per-token SFT loss
    assert packed_redi(ours, pairs, 0.0) == pytest.approx(sum(sft_each) / 3, abs=1e-5)


def test_collapse_warning_needs_both_log_probs_falling():
    from stages.redi import collapse_message

    falling = [-1.0, -1.0, -1.1, -1.2, -1.3, -1.4, -1.5, -1.6]
    rising = [-1.0, -0.9, -0.9, -0.8, -0.8, -0.7, -0.7, -0.6]
    assert "collapse" in collapse_message(falling, falling, 0.05)
    assert collapse_message(rising, falling, 0.05) is None
    assert collapse_message([-1.0], [-2.0], 0.05) is None


def _redi_overrides(data_root, extra=()):
    # 48 pairs, 8 pairs per step (4 per worker) -> 6 steps for one epoch
    return [f"data_root={data_root}", "redi.pairs_per_step=8", "redi.max_length=512",
            "redi.learning_rate=0.0001", "redi.save_steps=0", "redi.report_to=none", *extra]


@pytest.fixture(scope="module")
def redi_inputs(tmp_path_factory, tiny_model):
    data_root = str(tmp_path_factory.mktemp("redi-data"))
    write_select(data_root)
    sft = write_sft_version(data_root, tiny_model)
    return data_root, sft


def test_redi_stage_trains_from_the_sft_checkpoint(redi_inputs, tiny_model, ray_cluster):
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.config import load_recipe
    from pipeline.runner import run_stage

    data_root, sft = redi_inputs
    version = run_stage("redi", load_recipe(RECIPE, _redi_overrides(data_root), STAGES))
    stats = version.manifest["stats"]
    assert version.manifest["inputs"]["sft"] == sft.version and stats["start"] == sft.ref()
    assert stats["steps"] == 6 == len(stats["loss"])
    assert len(stats["logps_chosen"]) == len(stats["logps_rejected"]) == 6
    assert all(-20 < v < 0 for v in stats["logps_chosen"] + stats["logps_rejected"])
    before, after = load_weights(tiny_model), load_weights(version.path)
    assert all(not (before[k] == after[k]).all() for k in before)
    model = AutoModelForCausalLM.from_pretrained(version.path)
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 3


def test_dpo_baseline_trains_through_trl_on_the_same_pairs(redi_inputs, tiny_model, ray_cluster):
    from pipeline.config import load_recipe
    from pipeline.runner import run_stage

    data_root, _ = redi_inputs
    version = run_stage("redi", load_recipe(RECIPE, _redi_overrides(
        data_root, ["redi.loss=dpo", "redi.max_steps=2"]), STAGES))
    stats = version.manifest["stats"]
    assert stats["steps"] == 2 == len(stats["loss"])
    assert len(stats["logps_chosen_sum"]) == 2
    before, after = load_weights(tiny_model), load_weights(version.path)
    assert any(not (before[k] == after[k]).all() for k in before)


def test_simpo_baseline_trains_through_trl_on_the_same_pairs(redi_inputs, tiny_model, ray_cluster):
    """SimPO (TRL's CPOTrainer, loss_type simpo, no reference model) on its own, not only inside
    the ablations: a few steps, a finite loss, moved weights, the manifest says simpo."""
    import math

    from pipeline.config import load_recipe
    from pipeline.runner import run_stage

    data_root, _ = redi_inputs
    version = run_stage("redi", load_recipe(RECIPE, _redi_overrides(
        data_root, ["redi.loss=simpo", "redi.max_steps=2"]), STAGES))
    stats = version.manifest["stats"]
    assert version.manifest["config"]["loss"] == "simpo"
    assert stats["steps"] == 2 == len(stats["loss"])
    assert all(math.isfinite(v) for v in stats["loss"])
    before, after = load_weights(tiny_model), load_weights(version.path)
    assert any(not (before[k] == after[k]).all() for k in before)


def test_no_pairs_names_the_upstream_drop(tmp_path, tiny_model):
    from pipeline.config import load_recipe
    from pipeline.errors import UserError
    from pipeline.runner import run_stage

    data_root = str(tmp_path / "data")
    write_select(data_root, empty=True)
    write_sft_version(data_root, tiny_model)
    with pytest.raises(UserError, match="no pairs.*no_correct_trace"):
        run_stage("redi", load_recipe(RECIPE, _redi_overrides(data_root), STAGES))
