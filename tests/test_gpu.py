"""The CUDA-only code paths (issue 15), each on the tiny model with `resources` for one GPU.

Every test here needs a CUDA GPU and is skipped without one (CI has none). On the GPU machine
`bench/gpu_check.sh` runs this module (docs/gpu.md: the device plan). Each test runs the real
stage as its CPU test does (tests/test_sft.py, test_redi.py, test_provenance.py,
test_evaluate.py, test_generate.py) and checks what only the GPU path does: torch's flash
`varlen_attn` in bf16, Ray Train workers with `use_gpu` on NCCL under ZeRO-2 and ZeRO-3, scoring
actors on CUDA, several vLLM engines packed on one GPU, an engine swapped for another inside
one actor (its GPU memory must come back), per-request seeds.
"""
from __future__ import annotations

import pytest

from test_generate import N, PROBLEMS, _problems_file, _recipe, _rows
from test_provenance import SECRET, _traces, teacher  # noqa: F401 (teacher: a fixture)
from test_redi import _redi_overrides, write_sft_version
from test_sft import RECIPE, load_weights, sft_overrides, write_select
from test_verify import TEST_STAGES, write_generate
from stages import STAGES


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU")]

ONE_GPU_TRAINING = ["num_workers=1", "use_gpu=true", "cpus_per_worker=1"]


def changed(start, trained) -> bool:
    """Training moved this tensor. GPU training saves bf16: the fp32 start is rounded to the
    saved dtype first, or an untouched parameter would count as changed by the rounding alone."""
    return not (start.to(trained.dtype) == trained).all()


def _packed_batch(tokenizer):
    """One packed row of four samples of unequal length, through the real packing + collate."""
    from test_sft import _trace

    from stages.lib.chat import target_format
    from stages.lib.packed import collate, encode, packed_row

    fmt = target_format(tokenizer, "tiny", "", "chat", "think", "sft.student")
    samples = []
    for a, b, steps in ((12, 7, 1), (400, 99, 6), (3, 3, 2), (81, 19, 12)):
        p, c = encode(tokenizer, [{"role": "user", "content": f"Compute {a} + {b}."}],
                      _trace(a, b, steps, a + b), fmt)
        samples.append((p + c, len(p)))
    return collate([packed_row(samples)])


def test_flash_varlen_forward_matches_the_cpu_path(tiny_model):
    """The packed forward in bf16 on CUDA (torch's varlen_attn over cu_seqlens) gives the CPU
    fp32 path's completion log-probs to bf16 precision, and its attention stays inside each
    sample (a leak across samples would move the later samples' log-probs by far more)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.lib.packed import ATTENTION, completion_logps, register_attention

    register_attention()
    batch = _packed_batch(AutoTokenizer.from_pretrained(tiny_model))
    assert batch["n_seqs"] == 4
    out = {}
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype,
                                                     attn_implementation=ATTENTION).to(device)
        on = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.no_grad():
            out[device] = completion_logps(model.eval(), on).float().cpu()
    assert out["cuda"].shape == out["cpu"].shape and torch.isfinite(out["cuda"]).all()
    # bf16 carries ~3 significant digits; a random tiny model's log-probs are ~ -7.6 (ln 2048)
    assert (out["cuda"] - out["cpu"]).abs().mean() < 0.05, (out["cuda"] - out["cpu"]).abs().max()


def test_chunked_lm_head_on_the_flash_varlen_path(tiny_model):
    """Issue 29 on CUDA: the chunked LM-head loss (stages/lib/lm_head.py, 7 positions a chunk),
    recomputed and fused (sft's per-token weights), against the unchunked one on the bf16 flash
    varlen path: loss and every gradient to bf16 precision (tests/test_lm_head.py checks fp32
    to 1e-5 on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.lib.packed import ATTENTION, completion_logps, register_attention

    register_attention()
    batch = {k: v.cuda() if torch.is_tensor(v) else v
             for k, v in _packed_batch(AutoTokenizer.from_pretrained(tiny_model)).items()}
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16,
                                                 attn_implementation=ATTENTION).cuda()
    runs = {}
    weights = -torch.ones(len(batch["targets"]), device="cuda")  # sft's: the fused path
    for chunk, w in ((0, None), (7, None), (7, weights)):
        model.zero_grad(set_to_none=True)
        loss = -completion_logps(model, batch, chunk, w).mean()
        loss.backward()
        runs[chunk, w is not None] = loss.item(), {n: p.grad.float()
                                                   for n, p in model.named_parameters()}
    for key in ((7, False), (7, True)):
        assert runs[key][0] == pytest.approx(runs[0, False][0], abs=1e-2), key
        for name, grad in runs[0, False][1].items():
            scale = grad.abs().max().item() or 1.0
            assert (runs[key][1][name] - grad).abs().max().item() <= 2e-2 * scale, (key, name)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_sft_trains_on_one_gpu(tmp_path, tiny_model, ray_cluster, zero_stage):
    """A Ray Train worker with use_gpu (NCCL, bf16, flash varlen) under ZeRO-2 and ZeRO-3."""
    from transformers import AutoModelForCausalLM

    from pipeline.config import load_recipe
    from pipeline.runner import run_stage

    root = str(tmp_path / "data")
    write_select(root)
    resources = [f"resources.sft.{kv}" for kv in ONE_GPU_TRAINING + [f"zero_stage={zero_stage}"]]
    v = run_stage("sft", load_recipe(RECIPE, sft_overrides(root, tiny_model) + resources, STAGES))
    stats = v.manifest["stats"]
    assert stats["workers"] == 1 and stats["zero_stage"] == zero_stage
    first, last = stats["loss"][:3], stats["loss"][-3:]
    assert sum(last) / 3 < sum(first) / 3 - 0.5, stats["loss"]
    assert stats["peak_memory_mb"] > 0 and stats["tokens_per_s"] > 0   # the CUDA allocator's
    before, after = load_weights(tiny_model), load_weights(v.path)
    # ZeRO-3 must gather every parameter on save (a partitioned one is saved with shape [0])
    assert all(after[k].shape == before[k].shape for k in before)
    assert all(changed(before[k], after[k]) for k in before)
    AutoModelForCausalLM.from_pretrained(v.path)                         # a loadable checkpoint


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


@pytest.mark.skipif(_gpus() < 2, reason="sequence parallelism on NCCL needs 2 GPUs")
def test_sft_sequence_parallel_on_two_gpus(tmp_path, ray_cluster):
    """resources.sft.sequence_parallel=2 on NCCL (Ulysses' all-to-all over 2 GPUs, the flash
    varlen path on the whole row): both steps' losses are the single GPU's, to bf16 precision
    (tests/test_sequence_parallel.py checks gloo on CPU to 1e-4)."""
    from test_sequence_parallel import _sft

    gpu = ["resources.sft.use_gpu=true", "resources.sft.cpus_per_worker=1"]
    one = _sft(tmp_path, "one", gpu + ["resources.sft.num_workers=1"]).manifest["stats"]
    two = _sft(tmp_path, "two", gpu + ["resources.sft.num_workers=2",
                                       "resources.sft.sequence_parallel=2"]).manifest["stats"]
    assert two["sequence_parallel"] == 2 and two["steps"] == one["steps"] == 2
    assert two["loss"] == pytest.approx(one["loss"], abs=2e-2)


def test_redi_trains_on_one_gpu(tmp_path, tiny_model, ray_cluster):
    from pipeline.config import load_recipe
    from pipeline.runner import run_stage

    root = str(tmp_path / "data")
    write_select(root)
    write_sft_version(root, tiny_model)
    resources = [f"resources.redi.{kv}" for kv in ONE_GPU_TRAINING + ["zero_stage=2"]]
    v = run_stage("redi", load_recipe(RECIPE, _redi_overrides(root, resources), STAGES))
    stats = v.manifest["stats"]
    # 48 pairs, 8 a step on the one worker: 6 steps
    assert stats["steps"] == 6 == len(stats["loss"]) and stats["workers"] == 1
    assert all(-20 < x < 0 for x in stats["logps_chosen"] + stats["logps_rejected"])
    before, after = load_weights(tiny_model), load_weights(v.path)
    assert all(changed(before[k], after[k]) for k in before)


def test_provenance_scores_on_cuda_as_on_cpu(tmp_path, ray_cluster, teacher, tiny_model):
    """The scoring actor on a GPU (bf16) scores as the CPU actor (fp32) does and, like it,
    labels the learnt sentence teacher and selects its trace."""
    from pipeline.runner import run_stage

    rows = {}
    for name, extra in (("cpu", []), ("gpu", ["resources.provenance.gpus_per_replica=1"])):
        (tmp_path / name).mkdir()
        recipe = write_generate(tmp_path / name, _traces(), [
            f"teacher={teacher}", f"student={tiny_model}",
            "prune.budgets={easy: 100000, medium: 100000, hard: 100000}",
            "provenance.max_length=200", "provenance.shard_size=3", "provenance.rule=paper",
            "provenance.keep_per_problem=1", *extra])
        for stage in ("verify", "prune"):
            run_stage(stage, recipe, stages=TEST_STAGES, log=lambda *_: None)
        prov = run_stage("provenance", recipe, stages=TEST_STAGES, log=lambda *_: None)
        rows[name] = {r["trace_id"]: r for r in prov.read_table().to_pylist()}
    assert rows["gpu"].keys() == rows["cpu"].keys() and len(rows["gpu"]) == 7
    for tid, cpu in rows["cpu"].items():
        gpu = rows["gpu"][tid]
        assert gpu["sentence_spans"] == cpu["sentence_spans"]
        assert abs(gpu["lp_teacher"] - cpu["lp_teacher"]) < 0.05, tid
        assert abs(gpu["lp_student"] - cpu["lp_student"]) < 0.05, tid
    # A sentence near the beta margin may flip label between bf16 and fp32; the one the
    # teacher learnt may not, and the paper rule must pick its trace on both.
    for where in ("cpu", "gpu"):
        secret = next(r for r in rows[where].values() if SECRET in r["pruned_completion"])
        texts = [secret["pruned_completion"][a:b] for a, b in secret["sentence_spans"]]
        assert secret["sentence_labels"][texts.index(SECRET)] == "teacher", where
        assert secret["selected"], where


def test_evaluate_swaps_models_on_two_gpu_engines(tmp_path, ray_cluster, tiny_model):
    """Two engines on one GPU, each serving both models in turn: an engine shut down inside its
    actor must hand its GPU memory back before the next model's engine starts."""
    from test_evaluate import evaluate_inputs

    from pipeline.runner import run_stage
    from pipeline.apps.tiny_model import build_tiny_model

    other = build_tiny_model(str(tmp_path / "other"), seed=1)   # other weights: a real swap
    recipe, sft_path = evaluate_inputs(
        tmp_path, str(tmp_path / "data"), tiny_model, other, "{path: synthetic, synthetic_n: 8}",
        ["evaluate.synthetic_n=16", "evaluate.samples=2", "evaluate.pass_k=2",
         "evaluate.max_tokens=12", "evaluate.temperature=1.0",
         "resources.evaluate.replicas=2", "resources.evaluate.gpus_per_replica=0.5"])
    v = run_stage("evaluate", recipe)
    samples = v.read_table("samples").to_pylist()
    problems = v.manifest["stats"]["problems"]
    assert problems > 0 and len(samples) == 2 * problems * 2       # 2 models x problems x 2
    assert {r["model_path"] for r in samples} == {tiny_model, sft_path}
    assert all(0 < r["completion_tokens"] <= 12 for r in samples)


def test_two_engines_on_one_gpu_per_request_seeds(ray_cluster, tiny_model, tmp_path):
    """Two engines packed on one GPU (gpus_per_replica 0.5); per-request seeds make a rerun with
    a different shard size (so different batches) give the same samples."""
    from pipeline.runner import run_stage

    problems = _problems_file(tmp_path)
    out = {}
    for shard in (2, 5):
        recipe = _recipe(tmp_path / f"data-{shard}", problems, tiny_model,
                         [f"generate.shard_size={shard}",
                          "resources.generate.replicas=2", "resources.generate.gpus_per_replica=0.5"])
        run_stage("prompts", recipe, log=lambda *_: None)
        rows = _rows(run_stage("generate", recipe))
        assert len(rows) == PROBLEMS * N
        out[shard] = {r["trace_id"]: r["completion"] for r in rows}
    assert out[2] == out[5]
