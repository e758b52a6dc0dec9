"""kd stage: the chunked loss against a dense full-vocabulary computation of the same formula
(values and gradients, every divergence, several samples in a packed row), under DeepSpeed
ZeRO-3 on 2 gloo ranks, TAID's schedule carried by the checkpoint state; then two real runs on
Ray Train + DeepSpeed ZeRO-2 (2 gloo workers, tiny models): forward KL and TAID; and bad input.

The `distributions` version kd reads is written here through the real store: select-shaped SFT
rows (tests/test_sft.py) plus the top-k of a second tiny model (the teacher, same tokenizer,
other weights) computed by a plain transformers forward at the student's completion tokens.
"""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys

import pytest

from test_sft import RECIPE, _trace, load_weights
from stages import STAGES
from stages.lib.divergences import DIVERGENCES, TaidSchedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 8          # teacher entries per position in these tests
TOL = 1e-5     # fp32: chunked vs dense


@pytest.fixture(scope="module")
def teacher_model(tmp_path_factory, tiny_model):
    """A second tiny model: the student's tokenizer, other random weights."""
    from pipeline.apps.tiny_model import build_tiny_model

    path = build_tiny_model(str(tmp_path_factory.mktemp("tiny-teacher")), seed=1)
    with open(os.path.join(path, "tokenizer.json")) as a, \
            open(os.path.join(tiny_model, "tokenizer.json")) as b:
        assert a.read() == b.read()
    return path


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        messages = [{"role": "user", "content": f"Compute {a} + {b}."},
                    {"role": "assistant",
                     "content": _trace(a, b, rng.choice([1, 2, 4, 8]), a + b)}]
        rows.append({"problem_id": f"p{i}", "trace_id": f"t{i}", "messages": messages})
    return rows


def teacher_topk(teacher, prompt_ids: list[int], completion_ids: list[int]) -> dict:
    """The teacher's top-K at each completion token (a plain forward over the whole vocabulary)."""
    import torch

    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logps = teacher(input_ids=ids).logits[0].float().log_softmax(-1)
    at = logps[len(prompt_ids) - 1:-1]                                # predicts completion
    values, top = at.topk(K, dim=-1)
    return {"topk_ids": top.int().tolist(), "topk_logps": values.half().tolist(),
            "token_logp": at.gather(1, torch.tensor(completion_ids)[:, None])[:, 0].tolist(),
            "tail_mass": (1 - values.exp().sum(-1)).clamp(min=0).tolist(),
            "completion_ids": completion_ids}


def write_distributions(data_root: str, teacher_path: str, student_path: str, n: int = 16,
                        version: str = "test000distr", blank_row: int | None = None):
    """A complete `distributions` version: select's SFT columns + the teacher's columns at the
    student-form completion tokens (what stages/distributions.py writes). `blank_row`: that
    row's teacher columns are null."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.store import Store
    from stages.lib.chat import target_format
    from stages.lib.packed import encode

    tok = AutoTokenizer.from_pretrained(student_path)
    fmt = target_format(tok, student_path, "", "chat", "think", "test")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, attn_implementation="sdpa")
    rows = []
    for i, row in enumerate(sft_rows(n)):
        p, c = encode(tok, row["messages"][:-1], row["messages"][-1]["content"], fmt)
        captured = teacher_topk(teacher, p, c)
        if i == blank_row:
            captured = {key: None for key in captured}
        rows.append({**row, **captured})
    msg = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    schema = pa.schema([("problem_id", pa.string()), ("trace_id", pa.string()),
                        ("messages", msg), ("topk_ids", pa.list_(pa.list_(pa.int32()))),
                        ("topk_logps", pa.list_(pa.list_(pa.float16()))),
                        ("token_logp", pa.list_(pa.float32())),
                        ("tail_mass", pa.list_(pa.float32())),
                        ("completion_ids", pa.list_(pa.int32()))])
    store = Store(data_root)
    out = store.begin("distributions", version, clear=True)
    import numpy as np

    table = pa.Table.from_pylist(
        [{**r, "topk_logps": None if r["topk_logps"] is None else
          [np.asarray(x, dtype=np.float16) for x in r["topk_logps"]]} for r in rows],
        schema=schema)
    pq.write_table(table, os.path.join(out, "part-00000.parquet"))
    return store.commit("distributions", version, {
        "stage": "distributions", "version": version, "splits": [], "rows_in": n,
        "rows_out": n, "drops": {}, "inputs": {}, "schema": {c: "" for c in schema.names},
        "finished_at": "2026-12-07T00:00:00+00:00"})


def kd_overrides(data_root: str, student: str, extra=()) -> list[str]:
    # 16 rows of ~100-250 tokens, 1,024-token rows x 2 workers: ~3 packed rows per worker
    return [f"data_root={data_root}", f"student={student}", "kd.max_steps=4",
            "kd.tokens_per_step=2048", "kd.max_length=512", "kd.learning_rate=0.001",
            "kd.warmup_ratio=0.0", "kd.save_steps=0", *extra]


# --- the chunked loss against the dense formula ------------------------------------------------

def _packed_kd_batch(student_path: str, teacher_path: str, n: int = 5):
    """A packed row of n samples of unequal length, with the teacher's top-K of each position."""
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.kd import collate_kd
    from stages.lib.chat import target_format
    from stages.lib.packed import encode, packed_row

    tok = AutoTokenizer.from_pretrained(student_path)
    fmt = target_format(tok, student_path, "", "chat", "think", "test")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, attn_implementation="sdpa")
    seqs, ids, lps = [], [], []
    for row in sft_rows(n, seed=3):
        p, c = encode(tok, row["messages"][:-1], row["messages"][-1]["content"], fmt)
        got = teacher_topk(teacher, p, c)
        seqs.append((p + c, len(p)))
        ids.append(np.asarray(got["topk_ids"], dtype=np.int32))
        lps.append(np.asarray(got["topk_logps"], dtype=np.float16))
    row = packed_row(seqs)
    row["topk_ids"], row["topk_logps"] = np.concatenate(ids), np.concatenate(lps)
    return seqs, collate_kd([row])


def _dense_reference(model, seqs, batch, spec):
    """The same formula on each sample alone: stock sdpa forward, all logits, full log-softmax."""
    import torch

    from stages.lib.topk_loss import token_terms

    losses, at = [], 0
    for ids, n_prompt in seqs:
        logits = model(input_ids=torch.tensor([ids])).logits[0, n_prompt - 1:-1]
        n = len(ids) - n_prompt
        loss, _, _ = token_terms(logits, batch["targets"][at:at + n],
                                 batch["topk_ids"][at:at + n], batch["topk_logps"][at:at + n],
                                 spec)
        losses.append(loss)
        at += n
    return torch.cat(losses)


@pytest.fixture(scope="module")
def dense_setup(tiny_model, teacher_model):
    """(samples, packed batch, our model (varlen attention), the stock sdpa model)."""
    from transformers import AutoModelForCausalLM

    from stages.lib.packed import ATTENTION, register_attention

    seqs, batch = _packed_kd_batch(tiny_model, teacher_model)
    register_attention()
    return (seqs, batch,
            AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=ATTENTION),
            AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa"))


@pytest.mark.parametrize("name", DIVERGENCES)
def test_chunked_kd_loss_and_gradients_equal_the_dense_computation(dense_setup, name):
    from stages.lib.topk_loss import KdLoss, kd_token_losses

    seqs, batch, ours, dense = dense_setup
    ours.zero_grad(set_to_none=True)
    dense.zero_grad(set_to_none=True)
    assert len(batch["targets"]) > 3 * 64  # several chunks of 64 positions
    spec = KdLoss(name, kd_ratio=0.7, beta=0.3, alpha=0.2, t=0.55 if name == "taid" else None)
    got, ce, d = kd_token_losses(ours, batch, spec, chunk=64)
    ref = _dense_reference(dense, seqs, batch, spec)
    assert got.shape == ref.shape == (len(batch["targets"]),)
    assert (got - ref).abs().max().item() <= TOL
    assert (got - ((1 - 0.7) * ce + 0.7 * d)).abs().max().item() <= TOL
    assert d.min().item() >= -1e-6 and d.max().item() > 1e-3  # a divergence, not zero
    got.mean().backward()
    ref.mean().backward()
    grads = dict(dense.named_parameters())
    for pname, p in ours.named_parameters():
        diff = (p.grad - grads[pname].grad).abs().max().item()
        assert diff <= TOL, (pname, diff)


def _zero3_rank(rank: int, world: int, port: int, student: str, teacher: str, out: str):
    """One rank: a ZeRO-3 DeepSpeed engine around the student (the LM head partitioned: numel 0
    outside its call); the chunked kd loss through the engine, backward, the full gradients."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed
    import torch
    from deepspeed.utils import safe_get_full_grad
    from transformers import AutoModelForCausalLM

    from stages.lib.topk_loss import KdLoss, kd_token_losses
    from stages.lib.packed import ATTENTION, register_attention

    torch.set_num_threads(1)
    register_attention()
    deepspeed.init_distributed(dist_backend="gloo")
    _, batch = _packed_kd_batch(student, teacher)
    model = AutoModelForCausalLM.from_pretrained(student, attn_implementation=ATTENTION,
                                                 dtype=torch.float32)
    names = {id(p): n for n, p in model.named_parameters()}
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 3}, "zero_force_ds_cpu_optimizer": False,
          "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, config=ds,
                                      optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    assert engine.module.lm_head.weight.numel() == 0
    losses, _, _ = kd_token_losses(engine, batch, KdLoss("forward_kl", 0.5), chunk=64)
    loss = losses.mean()
    engine.backward(loss)
    grads = {names[id(p)]: safe_get_full_grad(p).clone() for p in engine.module.parameters()}
    if rank == 0:
        torch.save({"losses": losses.detach(), "grads": grads}, out)


@pytest.mark.slow  # ~100 s on the shared 2-core machine: two DeepSpeed processes
def test_chunked_kd_loss_under_zero3_on_two_gloo_ranks(tiny_model, teacher_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from stages.lib.topk_loss import KdLoss, kd_token_losses
    from stages.lib.packed import ATTENTION, register_attention

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "zero3.pt")
    code = ("import sys, torch.multiprocessing as mp; sys.path[:0] = [sys.argv[1], sys.argv[2]]; "
            "from test_kd import _zero3_rank; mp.spawn(_zero3_rank, args=(2, int(sys.argv[3]), "
            "sys.argv[4], sys.argv[5], sys.argv[6]), nprocs=2)")
    subprocess.run([sys.executable, "-c", code, ROOT, os.path.join(ROOT, "tests"), str(port),
                    tiny_model, teacher_model, out], check=True, timeout=300, cwd=ROOT)
    got = torch.load(out)
    register_attention()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=ATTENTION)
    _, batch = _packed_kd_batch(tiny_model, teacher_model)
    ref, _, _ = kd_token_losses(model, batch, KdLoss("forward_kl", 0.5), chunk=0)
    ref.mean().backward()
    assert (got["losses"] - ref.detach()).abs().max().item() <= TOL
    for name, p in model.named_parameters():
        diff = (got["grads"][name].view_as(p) - p.grad).abs().max().item()
        assert diff <= TOL, (name, diff)


def test_taid_state_is_saved_with_the_checkpoint_and_restored_on_resume(tmp_path):
    """The callback's state goes into trainer_state.json (ExportableState) and a resumed run
    (global_step > 0) continues from it; a fresh run keeps t_start."""
    from transformers import TrainerState

    from stages.kd import TaidState, taid_callback

    taid = TaidState(TaidSchedule(total_steps=10))
    callback = taid_callback(taid)
    for step, loss in enumerate([2.0, 1.5, 1.2], start=1):
        taid.last_j = loss
        callback.on_step_end(None, TrainerState(global_step=step), None)
    # what the Trainer writes into checkpoint-3/trainer_state.json and reads back on resume
    TrainerState(global_step=3, stateful_callbacks=[callback]).save_to_json(
        str(tmp_path / "trainer_state.json"))
    state = TrainerState.load_from_json(str(tmp_path / "trainer_state.json"))
    assert state.stateful_callbacks["TaidCallback"]["attributes"] == taid.schedule.state_dict()

    fresh = TaidState(TaidSchedule(total_steps=10))
    taid_callback(fresh).on_train_begin(None, TrainerState(global_step=0), None)
    assert fresh.schedule.t == 0.4
    resumed = TaidState(TaidSchedule(total_steps=10))
    taid_callback(resumed).on_train_begin(None, state, None)
    assert resumed.schedule.state_dict() == taid.schedule.state_dict()
    assert resumed.schedule.t > 0.4


# --- real runs ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kd_data(tmp_path_factory, tiny_model, teacher_model):
    data_root = str(tmp_path_factory.mktemp("kd-data"))
    write_distributions(data_root, teacher_model, tiny_model)
    return data_root


@pytest.fixture(scope="module")
def kd_run(kd_data, tiny_model, ray_cluster):
    from pipeline.config import load_recipe
    from pipeline.runner import run_stage

    return run_stage("kd", load_recipe(RECIPE, kd_overrides(kd_data, tiny_model), STAGES))


def test_kd_trains_and_writes_a_checkpoint_transformers_loads(kd_run, tiny_model):
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = kd_run.manifest
    stats = manifest["stats"]
    assert manifest["config"]["divergence"] == stats["divergence"] == "forward_kl"
    assert manifest["config"]["kd_ratio"] == stats["kd_ratio"] == 0.5
    assert stats["steps"] == 4 and stats["workers"] == 2 and stats["zero_stage"] == 2
    assert stats["teacher_k"] == K
    assert all(math.isfinite(x) for x in stats["loss"] + stats["kd_divergence"])
    assert len(stats["kd_ce"]) == len(stats["kd_divergence"]) == 4
    # each step's loss is the mix of its logged terms (kd_ratio 0.5)
    for loss, ce, d in zip(stats["loss"], stats["kd_ce"], stats["kd_divergence"]):
        assert loss == pytest.approx(0.5 * ce + 0.5 * d, rel=1e-3)
    assert stats["loss"][-1] < stats["loss"][0], stats["loss"]
    before, after = load_weights(tiny_model), load_weights(kd_run.path)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    tok = AutoTokenizer.from_pretrained(kd_run.path)
    model = AutoModelForCausalLM.from_pretrained(kd_run.path)
    ids = tok.apply_chat_template([{"role": "user", "content": "Compute 5 + 7."}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    with torch.no_grad():
        assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]


def test_taid_logs_t_and_follows_the_schedule(kd_data, tiny_model, ray_cluster):
    from pipeline.config import load_recipe
    from pipeline.runner import run_stage

    version = run_stage("kd", load_recipe(RECIPE, kd_overrides(
        kd_data, tiny_model, ["kd.divergence=taid", "kd.kd_ratio=1.0"]), STAGES))
    stats = version.manifest["stats"]
    t, j = stats["kd_taid_t"], stats["kd_divergence"]
    assert len(t) == len(j) == stats["steps"] == 4
    replay = TaidSchedule(total_steps=4)
    expected = []
    for step, loss in enumerate(j, start=1):
        expected.append(replay.t)
        replay.update(step, loss)
    assert t == pytest.approx(expected, abs=1e-4)
    # the first update only stores J; then t_lin = 0.4 + 0.6 step / 4 leads
    assert t[0] == t[1] == 0.4 and t[2] >= 0.7 and t[3] >= 0.85


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("override,match", [
    ("kd.kd_ratio=1.5", r"kd\.kd_ratio: 1\.5 is outside \[0, 1\]"),
    ("kd.kd_ratio=-0.1", r"kd\.kd_ratio"),
    ("kd.divergence=kl", r"kd\.divergence: 'kl' is not one of forward_kl, reverse_kl, jsd"),
])
def test_bad_kd_settings_are_user_errors(kd_data, tiny_model, override, match):
    from pipeline.config import load_recipe
    from pipeline.errors import UserError
    from pipeline.runner import run_stage

    with pytest.raises(UserError, match=match):
        run_stage("kd", load_recipe(RECIPE, kd_overrides(kd_data, tiny_model, [override]),
                                    STAGES))


def test_kd_without_distributions_is_a_user_error(tmp_path, tiny_model, teacher_model):
    from pipeline.config import load_recipe
    from pipeline.errors import UserError
    from pipeline.runner import run_stage

    data_root = str(tmp_path / "data")
    recipe = load_recipe(RECIPE, kd_overrides(data_root, tiny_model), STAGES)
    with pytest.raises(UserError, match="reads 'distributions'.*distillery run distributions"):
        run_stage("kd", recipe)
    write_distributions(data_root, teacher_model, tiny_model, n=4, version="test00blank1",
                        blank_row=2)
    with pytest.raises(UserError, match=r"distributions@test00blank1 has no teacher "
                                        r"distribution .* 1 of its 4 rows \(first: row 2\)"):
        run_stage("kd", recipe)


def test_distributions_of_other_tokens_are_a_user_error(tmp_path, tiny_model, teacher_model):
    """Teacher arrays captured for another text form (here: the raw prompt format) do not line
    up with kd's completion tokens: refused, naming the settings to align."""
    from pipeline.config import load_recipe
    from pipeline.errors import UserError
    from pipeline.runner import run_stage

    data_root = str(tmp_path / "data")
    write_distributions(data_root, teacher_model, tiny_model, n=4)
    recipe = load_recipe(RECIPE, kd_overrides(data_root, tiny_model,
                                              ["kd.reasoning_tags=thought"]), STAGES)
    with pytest.raises(UserError, match="not kd.student's tokens.*reasoning_tags"):
        run_stage("kd", recipe)


def test_evaluate_takes_kd_by_name(kd_run):
    """evaluate.models=[kd] reads the kd version (and only then) and samples its checkpoint;
    attribution.distilled=kd then names evaluate's rows of that model."""
    from stages.evaluate import EvaluateConfig, NAMED, resolve_models

    assert "kd" in NAMED and "kd" in STAGES["evaluate"].reads
    cfg = EvaluateConfig(models=["student", "kd"], student="/some/student", decontaminate=False)
    assert STAGES["evaluate"].uses(cfg) == {"kd"}
    assert STAGES["evaluate"].uses(EvaluateConfig(models=["student"], decontaminate=False)) \
        == set()
    assert resolve_models(cfg, {"kd": kd_run})["kd"] == kd_run.path


# --- MixKD: the mixed row, the mixed embeddings, a run with an online teacher -----------------

def test_mixed_row_pairs_samples_and_mixes_their_embeddings(dense_setup):
    import random

    import torch

    from stages.kd import _mixed_embeddings, mixed_row

    seqs, batch, model, _ = dense_setup
    row = mixed_row(batch, 0.4, random.Random(0))
    bounds = row["cu_seqlens"].tolist()
    ids, other = row["input_ids"][0].tolist(), row["other_ids"].tolist()
    lam, pos, keep = row["lam"].tolist(), row["position_ids"][0].tolist(), row["keep"].tolist()
    assert len(bounds) - 1 == (len(seqs) + 1) // 2       # 5 samples: 2 pairs + 1 odd one out
    assert row["max_seqlen"] == max(b - a for a, b in zip(bounds, bounds[1:]))
    by_ids = {tuple(s[:40]): (s, n) for s, n in seqs}
    for a, b in zip(bounds, bounds[1:]):
        assert pos[a:b] == list(range(b - a))
        assert len(set(lam[a:b])) == 1 and 0.0 <= lam[a] <= 1.0
        (sa, na), (sb, nb) = by_ids[tuple(ids[a:a + 40])], by_ids[tuple(other[a:a + 40])]
        m = min(len(sa), len(sb))
        assert b - a == m and ids[a:b] == sa[:m] and other[a:b] == sb[:m]
        # the loss positions: both samples in their completion, each predicting a next token
        assert [p - a for p in keep if a <= p < b] == list(range(max(na, nb) - 1, m - 1))
    assert row["targets"].tolist() == [ids[p + 1] for p in keep]

    emb = model.get_input_embeddings()
    x = row["input_ids"]
    with torch.no_grad():
        with _mixed_embeddings(model, row["other_ids"], row["lam"]):
            mixed = emb(x)
        w = row["lam"][None, :, None]
        expected = w * emb(x) + (1 - w) * emb(row["other_ids"][None])
        assert "forward" not in emb.__dict__                    # the hook is gone
    assert torch.allclose(mixed, expected, atol=1e-6)
    # Beta(0.4, 0.4) over many pairs: U-shaped, mean 1/2
    draws = [random.Random(s).betavariate(0.4, 0.4) for s in range(2000)]
    assert abs(sum(draws) / len(draws) - 0.5) < 0.03
    assert sum(d < 0.1 or d > 0.9 for d in draws) > 0.4 * len(draws)


def test_mixkd_trains_with_an_online_teacher(kd_data, tiny_model, teacher_model, ray_cluster):
    import math

    import torch

    from pipeline.config import load_recipe
    from pipeline.runner import run_stage

    version = run_stage("kd", load_recipe(RECIPE, kd_overrides(
        kd_data, tiny_model, [f"teacher={teacher_model}", "kd.online_teacher=true",
                              "kd.max_steps=2"]), STAGES))
    stats = version.manifest["stats"]
    assert stats["online_teacher"] is True and stats["steps"] == 2
    assert len(stats["kd_mixup"]) == 2
    assert all(math.isfinite(x) and x >= 0 for x in stats["kd_mixup"])
    # the logged loss is the stored-distribution loss plus the mixup term (weight 1)
    for loss, ce, d, mix in zip(stats["loss"], stats["kd_ce"], stats["kd_divergence"],
                                stats["kd_mixup"]):
        assert loss == pytest.approx(0.5 * ce + 0.5 * d + mix, rel=1e-3)
    before, after = load_weights(tiny_model), load_weights(version.path)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_mixkd_refuses_another_tokenizer_and_a_teacher_that_does_not_fit(
        kd_data, tiny_model, teacher_model, tmp_path, monkeypatch):
    from pipeline.apps.tiny_model import build_tiny_model
    from pipeline.config import load_recipe
    from pipeline.errors import UserError
    from pipeline.runner import run_stage
    import stages.kd

    # the tiny tokenizer saturates at 540 entries: 512 is another vocabulary
    other = build_tiny_model(str(tmp_path / "other-tokenizer"), vocab_size=512)
    with pytest.raises(UserError, match=r"kd\.teacher: MixKD needs the student's tokenizer"):
        run_stage("kd", load_recipe(RECIPE, kd_overrides(
            kd_data, tiny_model, [f"teacher={other}", "kd.online_teacher=true"]), STAGES))
    # a machine with a millionth of the memory it has: the teacher's copies do not fit
    monkeypatch.setattr(stages.kd, "TEACHER_SHARE", 1e-6)
    with pytest.raises(UserError, match=r"kd\.online_teacher: the teacher .* would not fit"):
        run_stage("kd", load_recipe(RECIPE, kd_overrides(
            kd_data, tiny_model, [f"teacher={teacher_model}", "kd.online_teacher=true"]),
            STAGES))
    with pytest.raises(UserError, match=r"kd\.mixup_alpha"):
        run_stage("kd", load_recipe(RECIPE, kd_overrides(
            kd_data, tiny_model, [f"teacher={teacher_model}", "kd.online_teacher=true",
                                  "kd.mixup_alpha=0"]), STAGES))
