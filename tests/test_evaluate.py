"""evaluate: the pass@k estimator, the summary, and one real run on vLLM (tiny random model)."""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import shutil

import pytest

from stages.evaluate import format_table, pass_at_k, summarize
from stages import STAGES


def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    """The definition: the share of k-subsets of the n samples holding a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_its_definition(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_edges_and_closed_forms():
    assert pass_at_k(16, 0, 4) == 0.0
    assert pass_at_k(16, 16, 4) == 1.0
    assert pass_at_k(16, 13, 4) == 1.0          # only 3 wrong: any 4 hold a correct one
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c / n
    # Large n stays finite and equals the binomial form.
    assert pass_at_k(200, 7, 50) == pytest.approx(1 - math.comb(193, 50) / math.comb(200, 50))
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 2, 5)


def test_summarize_per_level_and_overall():
    rng = random.Random(0)
    rows, truth = [], {}
    for pid in range(12):
        level = str(1 + pid % 3)
        c = rng.randint(0, 4)
        truth[pid] = (level, c)
        for s in range(4):
            rows.append({"model": "m", "problem_id": str(pid), "difficulty": level,
                         "correct": s < c, "completion_tokens": 10 + pid,
                         "finish_reason": "length" if pid == 0 else "stop"})
    # An unverifiable sample counts as wrong, not as skipped.
    rows[1]["correct"] = None  # problem 0, sample 1: correct when c >= 2
    truth[0] = (truth[0][0], truth[0][1] - (truth[0][1] >= 2))
    out = {r["difficulty"]: r for r in summarize(rows, k=2)}
    assert set(out) == {"all", "1", "2", "3"}
    for level in ("all", "1", "2", "3"):
        pids = [p for p, (lv, _) in truth.items() if level in ("all", lv)]
        want1 = sum(truth[p][1] / 4 for p in pids) / len(pids)
        want2 = sum(pass_at_k(4, truth[p][1], 2) for p in pids) / len(pids)
        assert out[level]["pass_at_1"] == pytest.approx(want1, abs=1e-4)
        assert out[level]["pass_at_k"] == pytest.approx(want2, abs=1e-4)
        assert out[level]["problems"] == len(pids)
    assert out["all"]["mean_completion_tokens"] == pytest.approx(sum(10 + p for p in range(12)) / 12)
    assert out["all"]["truncated_share"] == pytest.approx(4 / 48, abs=1e-4)
    assert "pass@2" in format_table(summarize(rows, k=2))


def _model_version(data_root: str, stage: str, model_dir: str) -> str:
    """A real checkpoint committed as a model version (what sft/redi write)."""
    from pipeline.store import Store

    store = Store(data_root)
    tmp = store.begin(stage, f"{stage}000test", clear=True)
    for name in os.listdir(model_dir):
        shutil.copy(os.path.join(model_dir, name), tmp)
    v = store.commit(stage, f"{stage}000test", {"stage": stage, "output": "model",
                                                 "inputs": {}, "stats": {}})
    return v.path


def evaluate_inputs(tmp_path, data_root: str, teacher: str, sft_model: str, prompts: str,
                    overrides: list[str]):
    """What evaluate of [teacher, sft] reads: sft and redi versions (sft = sft_model's checkpoint),
    a recipe with `prompts` (its YAML mapping) and a prompts version. (recipe, the sft path)."""
    from pipeline.config import load_recipe
    from pipeline.runner import run_stage

    sft_path = _model_version(data_root, "sft", sft_model)
    _model_version(data_root, "redi", teacher)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"data_root: {data_root}\nteacher: {teacher}\nprompts: {prompts}\n")
    recipe = load_recipe(str(recipe_file), ["evaluate.models=[teacher, sft]", *overrides], STAGES)
    run_stage("prompts", recipe)
    return recipe, sft_path


def test_evaluate_stage_on_vllm(ray_cluster, tiny_model, data_root, tmp_path):
    """Real vLLM + math-verify: two models, held-out synthetic problems, one contaminated."""
    import pyarrow.parquet as pq

    from pipeline.runner import run_stage
    from stages.evaluate import EvaluateConfig, load_eval_problems

    cfg = EvaluateConfig(synthetic_n=6, synthetic_seed=5)
    leaked = load_eval_problems(cfg)[0]["problem"]
    train_file = tmp_path / "train.jsonl"
    train_file.write_text(json.dumps({"problem": leaked, "answer": "0"}) + "\n"
                          + json.dumps({"problem": "Compute 1 + 1.", "answer": "2"}) + "\n")
    recipe, sft_path = evaluate_inputs(tmp_path, data_root, tiny_model, tiny_model,
                                       f"{{path: {train_file}}}", [
        "evaluate.synthetic_n=6", "evaluate.synthetic_seed=5", "evaluate.samples=3",
        "evaluate.pass_k=2", "evaluate.max_tokens=12", "evaluate.temperature=1.0",
        "evaluate.problem_template='{problem}'"])
    v = run_stage("evaluate", recipe)

    assert v.manifest["drops"] == {"contaminated": 1}
    samples = v.read_table("samples")
    assert samples.num_rows == 2 * 5 * 3  # 2 models x 5 problems x 3 samples
    assert leaked not in samples.column("problem").to_pylist()
    assert set(samples.column("model_path").to_pylist()) == {tiny_model, sft_path}
    assert all(0 < t <= 12 for t in samples.column("completion_tokens").to_pylist())
    # A random-init model writes no \boxed answer: every sample is checked and found wrong.
    statuses = set(samples.column("verify_status").to_pylist())
    assert statuses <= {"no_answer", "ok"}
    summary = {(r["model"], r["difficulty"]): r for r in v.read_table("summary").to_pylist()}
    for model in ("teacher", "sft"):
        mine = [r for r in samples.to_pylist() if r["model"] == model]
        assert summary[(model, "all")]["pass_at_1"] == pytest.approx(
            sum(bool(r["correct"]) for r in mine) / len(mine), abs=1e-4)
        assert summary[(model, "all")]["mean_completion_tokens"] == pytest.approx(
            sum(r["completion_tokens"] for r in mine) / len(mine), abs=0.05)
        assert summary[(model, "all")]["problems"] == 5
    assert v.manifest["stats"]["models"] == {"teacher": tiny_model, "sft": sft_path}
    assert pq.read_schema(v.parquet_files("summary")[0]).field("pass_at_k") is not None


def test_evaluate_asks_exactly_as_generate_does():
    """One renderer, one default: a template copied from generate (with \\boxed{}) works."""
    from stages.evaluate import EvaluateConfig
    from stages.lib.chat import prompt_messages
    from stages.generate import GenerateConfig

    problem = "Compute {x} + 2."  # braces in the problem must survive too
    assert prompt_messages(problem, EvaluateConfig()) == prompt_messages(problem, GenerateConfig())
    cfg = EvaluateConfig(system_prompt="S", problem_template="Q: {problem} \\boxed{}")
    assert prompt_messages(problem, cfg) == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q: Compute {x} + 2. \\boxed{}"}]


def test_one_engine_actor_serves_each_batch_its_own_model(ray_cluster, tiny_model, tmp_path):
    """complete_chats(model_column=…), what evaluate runs: one actor swaps engines between
    batches of different models. Greedy, so a model's completions are a function of the model:
    model A before and after a swap to B gives the same text, and B's differs from A's."""
    import pyarrow as pa
    import ray.data

    from cluster.inference import Sampling, complete_chats
    from pipeline.resources import StageResources
    from pipeline.stage import Context
    from pipeline.apps.tiny_model import build_tiny_model

    other = build_tiny_model(str(tmp_path / "other"), seed=1)
    chats = [[{"role": "user", "content": f"Compute {i} + 2."}] for i in range(3)]

    def block(path: str, tag: str) -> pa.Table:
        return pa.table({"tag": [tag] * 3, "i": list(range(3)), "msgs": chats,
                         "model_path": [path] * 3})

    ctx = Context(stage="t", version="t", out_dir=str(tmp_path), data_root=str(tmp_path),
                  teacher="", student="", resources=StageResources(enforce_eager=True))
    ds = ray.data.from_arrow([block(tiny_model, "a1"), block(other, "b"), block(tiny_model, "a2")])
    out = complete_chats(ds, model=tiny_model, messages_column="msgs", n=1,
                         sampling=Sampling(temperature=0.0, max_tokens=8),
                         resources=ctx.resources, ctx=ctx, batch_size=None,
                         model_column="model_path").take_all()
    text = {(r["tag"], r["i"]): r["completion"] for r in out}
    assert len(text) == 9 and all(r["finish_reason"] in ("stop", "length") for r in out)
    assert [text[("a1", i)] for i in range(3)] == [text[("a2", i)] for i in range(3)]
    assert [text[("b", i)] for i in range(3)] != [text[("a1", i)] for i in range(3)]
