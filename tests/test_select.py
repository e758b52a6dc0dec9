"""select: the SFT split (chat messages, per-problem cap) and REDI pairs (seeded, TRL format)."""
from __future__ import annotations

from stages.select import SelectConfig, assistant_text, plan
from test_verify import run, trace, write_generate
from stages import STAGES


def _rows():
    rows = []
    # P1: 3 correct, 3 incorrect -> a pair; at most sft_per_problem correct traces in SFT.
    for i, ans in enumerate(["4", "4", "5", "4", "6", "7"]):
        rows.append(trace("Compute 2 + 2.", "4",
                          f"<think>\nstep {i}\n</think>\nSo \\boxed{{{ans}}}", i, 10 + i))
    # P2: all correct -> no pair (no_incorrect).
    for i in range(2):
        rows.append(trace("Compute 1 + 0.", "1", "<think>\nok\n</think>\n\\boxed{1}", i, 5))
    # P3: all incorrect -> no pair (no_correct); kept upstream, it is REDI data elsewhere.
    for i in range(2):
        rows.append(trace("Compute 3 + 0.", "3", "<think>\nhm\n</think>\n\\boxed{0}", i, 5))
    # P4: the only incorrect trace is too long for a pair.
    rows.append(trace("Compute 5 + 0.", "5", "<think>\nok\n</think>\n\\boxed{5}", 0, 5))
    rows.append(trace("Compute 5 + 0.", "5", "<think>\nlong\n</think>\n\\boxed{9}", 1, 50_000))
    return rows


def test_select_sft_and_pairs(tmp_path, ray_cluster):
    recipe = write_generate(tmp_path, _rows(), [
        "prune.budgets={easy: 100000, medium: 100000, hard: 100000}",
        "provenance.method=none", "select.sft_per_problem=2", "select.seed=7"])
    run("verify", recipe)
    run("prune", recipe)
    pruned = run("provenance", recipe)    # method none: every prune row, selected = correct
    s = run("select", recipe)
    assert s.splits == ["sft", "pairs"]
    sft = s.read_table("sft").to_pylist()
    pairs = s.read_table("pairs").to_pylist()

    # What the plan says, from the prune version's rows, is exactly what was written.
    rows = pruned.read_table().to_pylist()
    assert all(r["selected"] == (r["correct"] is True) for r in rows)
    want_sft, want_pairs, no_pair = plan(rows, SelectConfig(seed=7, sft_per_problem=2))
    assert [r["trace_id"] for r in sft] == [r["trace_id"] for r in want_sft]
    assert [(p["chosen_trace_id"], p["rejected_trace_id"]) for p in pairs] == \
        [(c["trace_id"], r["trace_id"]) for c, r in want_pairs]

    by_id = {r["trace_id"]: r for r in rows}
    per_problem = {}
    for r in sft:
        src = by_id[r["trace_id"]]
        assert src["correct"] is True
        per_problem[r["problem_id"]] = per_problem.get(r["problem_id"], 0) + 1
        assert r["messages"][:-1] == src["prompt_messages"]
        assert r["messages"][-1] == {"role": "assistant",
                                     "content": f"<think>\n{src['reasoning']}\n</think>\n\n"
                                                f"{src['final']}"}
        assert r["difficulty"] == src["difficulty"] and r["source"] == "test"
    assert sorted(per_problem.values()) == [1, 2, 2]        # P1 capped at 2; P2 2; P4 1

    assert len(pairs) == 1
    pair = pairs[0]
    chosen, rejected = by_id[pair["chosen_trace_id"]], by_id[pair["rejected_trace_id"]]
    assert chosen["correct"] is True and rejected["correct"] is False
    assert chosen["problem_id"] == rejected["problem_id"] == pair["problem_id"]
    assert pair["prompt"] == chosen["prompt_messages"]
    assert pair["chosen"] == [{"role": "assistant",
                               "content": assistant_text(chosen["pruned_completion"], "think")}]
    assert pair["rejected"][0]["role"] == "assistant" and "\\boxed{" in pair["rejected"][0]["content"]
    assert s.manifest["stats"]["problems_without_pair"] == {
        "no_correct": 1, "no_incorrect": 1, "prompt_too_long": 0, "response_too_long": 1}
    assert s.manifest["stats"]["pairs"] == 1 and s.manifest["stats"]["sft_rows"] == 5


def _plan_rows(n=8):
    return [{"problem_id": "p", "trace_id": f"t{i:02d}", "correct": i % 2 == 0,
             "selected": i % 2 == 0, "prompt_tokens": 10, "pruned_tokens": 10} for i in range(n)]


def test_pairs_deterministic_under_the_seed():
    rows = _plan_rows()
    a = plan(rows, SelectConfig(seed=3))
    b = plan(list(reversed(rows)), SelectConfig(seed=3))     # row order does not matter
    pick = lambda res: [(c["trace_id"], r["trace_id"]) for c, r in res[1]]
    assert pick(a) == pick(b)
    # Over a few seeds the first correct/incorrect differ: the shuffle is really seeded.
    assert len({tuple(pick(plan(rows, SelectConfig(seed=s)))) for s in range(8)}) > 1


def test_sft_rows_render_with_assistant_only_mask(tmp_path, ray_cluster, tiny_model):
    from transformers import AutoTokenizer

    recipe = write_generate(tmp_path, _rows()[:6], ["provenance.method=none"])
    run("verify", recipe)
    run("prune", recipe)
    run("provenance", recipe)
    s = run("select", recipe)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = s.read_table("sft").to_pylist()
    assert rows
    for row in rows:
        enc = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        ids, mask = enc["input_ids"], enc["assistant_masks"]
        assert len(ids) == len(mask)
        trained = [t for t, m in zip(ids, mask) if m]
        ignored = [t for t, m in zip(ids, mask) if not m]
        # Exactly the assistant turn (its content and the end-of-turn token) carries the loss.
        assert tok.decode(trained) == row["messages"][-1]["content"] + "<|im_end|>"
        assert tok.decode(ignored) == ("<|im_start|>user\n" + row["messages"][0]["content"]
                                       + "<|im_end|>\n<|im_start|>assistant\n\n")
        # The masked part is one contiguous span at the end (before the template's last "\n").
        first = mask.index(1)
        assert all(mask[first:first + len(trained)]) and sum(mask) == len(trained)


def test_verify_prune_select_on_real_generated_traces(tmp_path, ray_cluster, tiny_model):
    """prompts -> generate (vLLM, the tiny model) -> verify -> prune -> provenance (the tiny model
    as teacher and student) -> select, real stages."""
    from pipeline.config import load_recipe
    from pipeline.runner import run_stage
    from stages.lib.answers import DEFAULT_FALLBACKS, extract_answer

    recipe = load_recipe("configs/tiny.yaml", [
        f"data_root={tmp_path / 'data'}", f"teacher={tiny_model}", f"student={tiny_model}",
        "prompts.synthetic_n=6",
        "generate.n=4", "generate.max_tokens=24", "generate.shard_size=6"], STAGES)
    quiet = dict(log=lambda *_: None)
    run_stage("prompts", recipe, **quiet)
    gen = run_stage("generate", recipe, **quiet)
    v = run_stage("verify", recipe, **quiet)
    p = run_stage("prune", recipe, **quiet)
    prov = run_stage("provenance", recipe, **quiet)
    s = run_stage("select", recipe, **quiet)

    traces = gen.read_table().to_pylist()
    rows = {r["trace_id"]: r for r in v.read_table().to_pylist()}
    assert sorted(rows) == sorted(r["trace_id"] for r in traces)   # verify keeps every trace
    for t in traces:
        r = rows[t["trace_id"]]
        # A trace cut at max_tokens gets no math-verify fallback (stages/verify.py answer_parts).
        cut = t["finish_reason"] == "length"
        want = extract_answer(t["final"], ["answer_is"] if cut else DEFAULT_FALLBACKS)
        assert r["pred_answer"] == want
        assert r["verify_status"] in ("ok", "no_answer")           # every problem has a reference
        assert r["correct"] == (r["verify_status"] == "ok" and r["correct"])
    for pid in {r["problem_id"] for r in rows.values()}:
        mine = [r for r in rows.values() if r["problem_id"] == pid]
        assert len(mine) == 4
        assert {r["pass_rate"] for r in mine} == {sum(r["correct"] for r in mine) / 4}
    assert v.manifest["stats"]["traces"] == 24

    # prune keeps every incorrect trace; select pairs/SFT rows only from what prune kept.
    pruned = p.read_table().to_pylist()
    assert sum(r["prune_status"] == "incorrect" for r in pruned) == \
        sum(r["correct"] is False for r in rows.values())
    st = s.manifest["stats"]
    assert st["problems"] == 6
    assert st["pairs"] + sum(st["problems_without_pair"].values()) == 6
    assert st["sft_rows"] == s.rows["sft"] and st["pairs"] == s.rows["pairs"]
    # provenance scored every prune row (teacher = student here: every sentence "common",
    # score 0) and select's SFT rows are exactly the selected traces within its cap.
    scored = prov.read_table().to_pylist()
    assert len(scored) == len(pruned)
    # Text a model does not write in its target (a random model's words before an opening tag:
    # the reasoning starts after it) is "unscored"; every scored sentence is common.
    assert all(set(r["sentence_labels"]) <= {"common", "unscored"}
               and abs(r["provenance_score"]) < 1e-5
               for r in scored if r["sentence_labels"])
    assert any("common" in r["sentence_labels"] for r in scored)
    sft_ids = {r["trace_id"] for r in s.read_table("sft").to_pylist()}
    assert sft_ids <= {r["trace_id"] for r in scored if r["selected"]}
