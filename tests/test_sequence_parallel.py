"""Sequence parallelism (stages/lib/sequence_parallel.py): one packed row split over 2 gloo CPU
workers gives the single worker's loss, log-probs and gradients."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5

# samples of unequal length whose total (244) is not a multiple of the 3 a pad test uses, and
# whose completions straddle the 2 workers' halves
LENGTHS = ((40, 5), (90, 20), (13, 3), (70, 1), (31, 30))


def _batch(vocab: int):
    import torch

    from stages.lib.packed import collate, packed_row

    g = torch.Generator().manual_seed(0)
    seqs = [(torch.randint(5, vocab, (n,), generator=g).tolist(), p) for n, p in LENGTHS]
    return collate([packed_row(seqs)])


def _sp_rank(rank: int, world: int, port: int, model_path: str, out: str) -> None:
    """One of `world` workers sharing the row: its slice, sft's loss, backward, the gradients
    summed over the workers / world (DeepSpeed's data-parallel average); rank 0 saves them."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from stages.lib import sequence_parallel
    from stages.lib.packed import ATTENTION, completion_logps, register_attention
    from stages.lib.trainer import global_sum

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    register_attention()
    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation=ATTENTION,
                                                 dtype=torch.float32)
    sequence_parallel.enable(model, world)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from stages.lib.packed import varlen_attention
    assert ALL_ATTENTION_FUNCTIONS[ATTENTION] is not varlen_attention  # Ulysses wraps it
    batch = sequence_parallel.shard_row(_batch(model.config.vocab_size), rank, world)
    results = {}
    for fused in (False, True):
        model.zero_grad()
        weights = torch.full(batch["targets"].shape, -1.0) if fused else None
        logps = completion_logps(model, batch, 7, weights)
        loss = -logps.sum() * (world / global_sum(logps.numel()))   # stages/sft.py sft_loss
        loss.backward()
        grads = {}
        for name, p in model.named_parameters():
            dist.all_reduce(p.grad)
            grads[name] = p.grad / world
        gathered = [None] * world
        dist.all_gather_object(gathered, (batch["keep"] + rank * batch["input_ids"].shape[1],
                                          logps.detach()))
        results[fused] = {"loss": global_sum(loss.item()) / world, "grads": grads,
                          "logps": torch.cat([lp for _, lp in gathered]),
                          "keep": torch.cat([k for k, _ in gathered])}
    if rank == 0:
        torch.save(results, out)


def test_shard_row_pads_and_splits_the_completion_positions():
    import torch

    from stages.lib.sequence_parallel import shard_row

    batch = _batch(500)
    total = batch["input_ids"].shape[1]
    shards = [shard_row(batch, r, 3) for r in range(3)]
    width = shards[0]["input_ids"].shape[1]
    assert width * 3 == total + (-total % 3) and -total % 3
    assert shards[0]["cu_seqlens"][-1] == width * 3      # the pad is a sample of its own
    keep = torch.cat([s["keep"] + r * width for r, s in enumerate(shards)])
    assert (keep == batch["keep"]).all()
    assert (torch.cat([s["targets"] for s in shards]) == batch["targets"]).all()


def test_two_workers_give_the_single_workers_loss_and_gradients(tiny_model, tmp_path):
    import socket

    import torch
    from transformers import AutoModelForCausalLM

    from stages.lib.packed import ATTENTION, completion_logps, register_attention

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "sp.pt")
    code = ("import sys, torch.multiprocessing as mp; sys.path[:0] = [sys.argv[1], sys.argv[2]]; "
            "from test_sequence_parallel import _sp_rank; "
            "mp.spawn(_sp_rank, args=(2, int(sys.argv[3]), sys.argv[4], sys.argv[5]), nprocs=2)")
    subprocess.run([sys.executable, "-c", code, ROOT, os.path.join(ROOT, "tests"), str(port),
                    tiny_model, out], check=True, timeout=300, cwd=ROOT)
    results = torch.load(out)

    register_attention()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=ATTENTION,
                                                 dtype=torch.float32)
    batch = _batch(model.config.vocab_size)
    ref = completion_logps(model, batch, 0)
    loss = -ref.mean()
    loss.backward()
    for fused, r in results.items():
        assert (r["keep"] == batch["keep"]).all()
        assert (r["logps"] - ref.detach()).abs().max().item() <= TOL, fused
        assert r["loss"] == pytest.approx(loss.item(), abs=TOL), fused
        for name, p in model.named_parameters():
            diff = (r["grads"][name] - p.grad).abs().max().item()
            assert diff <= TOL, (fused, name, diff)


# --- the sft stage -------------------------------------------------------------------------------

def _sft(tmp_path, name: str, extra: list[str]):
    from test_sft import RECIPE, sft_overrides, write_select

    from pipeline.config import load_recipe
    from pipeline.runner import run_stage
    from pipeline.apps.tiny_model import build_tiny_model
    from stages import STAGES

    model = build_tiny_model(str(tmp_path / "model"))
    data_root = str(tmp_path / name)
    write_select(data_root, n=8)
    # ~8 samples of 100-400 tokens: one 8,192-token row, trained twice (two epochs), so step 2's
    # loss shows the first update's gradients
    return run_stage("sft", load_recipe(RECIPE, sft_overrides(data_root, model) + [
        "sft.epochs=2", "sft.tokens_per_step=8192", "sft.report_to=none"] + extra, STAGES))


@pytest.mark.slow  # two sft runs (418 s under load)
def test_sft_on_two_sequence_parallel_workers_trains_as_one_worker(tmp_path, ray_cluster):
    """resources.sft.sequence_parallel=2 on 2 gloo workers: each holds half of the row, and
    both steps' losses are the single worker's."""
    one = _sft(tmp_path, "one", ["resources.sft.num_workers=1"]).manifest["stats"]
    two = _sft(tmp_path, "two", ["resources.sft.num_workers=2",
                                 "resources.sft.sequence_parallel=2"]).manifest["stats"]
    assert one["packed_rows"] == two["packed_rows"] == 1
    assert two["sequence_parallel"] == 2 and two["workers"] == 2 and two["steps"] == 2
    assert two["tokens_seen"] == one["tokens_seen"]
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-4)


def test_sequence_parallel_that_does_not_divide_is_refused(tmp_path, ray_cluster):
    """Workers that N does not divide: exit 2 before training; heads that N does not divide
    (UlyssesSPAttentionHF's requirement): the stage's check names them."""
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="sequence_parallel: 3"):
        _sft(tmp_path, "bad", ["resources.sft.num_workers=2", "resources.sft.sequence_parallel=3"])
    from transformers import Qwen2Config

    from stages.lib.sequence_parallel import check

    assert check(Qwen2Config(num_attention_heads=4, num_key_value_heads=2), 2) is None
    assert check(Qwen2Config(num_attention_heads=4, num_key_value_heads=1), 2) is None
    assert "heads do not divide" in check(Qwen2Config(num_attention_heads=3,
                                                       num_key_value_heads=1), 2)
    assert "neither divides" in check(Qwen2Config(num_attention_heads=12,
                                                  num_key_value_heads=3), 2)


@pytest.mark.parametrize("stage", ["redi", "kd", "opd"])
def test_stages_whose_loss_needs_whole_rows_refuse_it_before_any_work(stage, tmp_path):
    """redi's pairs, kd's stored top-k and opd's recorded log-probs are not sliced by
    shard_row: resources.<stage>.sequence_parallel 2 is a UserError naming the key (exit 2
    through the CLI) before the stage reads an input (it is handed none here)."""
    from pipeline.config import load_recipe
    from pipeline.errors import UserError
    from pipeline.stage import Context
    from stages import STAGES

    recipe = load_recipe(os.path.join(ROOT, "configs", "tiny.yaml"), [
        f"data_root={tmp_path}", f"resources.{stage}.num_workers=2",
        f"resources.{stage}.sequence_parallel=2"], STAGES)
    ctx = Context(stage=stage, version="v", out_dir=str(tmp_path / "out"),
                  data_root=str(tmp_path), teacher="", student="",
                  resources=recipe.resources[stage])
    with pytest.raises(UserError, match=rf"resources\.{stage}\.sequence_parallel: 2 \(only sft"):
        STAGES[stage].run(recipe.configs[stage], {}, ctx)
