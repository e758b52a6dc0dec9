"""Training and scoring targets under the chat templates real models ship.

Every template in ../shared/real/chat_templates/ runs on a tiny tokenizer that has that model's
special tokens, with both forms of a stored trace (opening tag present, or already opened by
the teacher's prompt). The tokens trained (sft rows, redi pairs) and scored (provenance) must
decode to reasoning + closing tag + answer + that model's stop token, after a prompt that ends
with the template's generation prompt. Then one end-to-end run: a tiny student trained by the
sft stage on an R1-Distill template, sampled by vLLM with the same template, writes its
reasoning and stops.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.path.join(ROOT, "..", "shared", "real")
TEMPLATES = os.path.join(REAL, "chat_templates")

R1 = {"bos": "<｜begin▁of▁sentence｜>", "eos": "<｜end▁of▁sentence｜>",
      "special": ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]}
CHATML = {"bos": None, "eos": "<|im_end|>",
          "special": ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"]}
LLAMA = {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>",
         "special": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}

# template file -> (its model's special tokens, the generation prompt, the stop token)
FAMILIES = {
    "deepseek-r1-distill.original.jinja": (R1, "<｜Assistant｜>", R1["eos"]),
    "deepseek-r1-distill.later.jinja": (R1, "<｜Assistant｜><think>\n", R1["eos"]),
    "qwq-32b.jinja": (CHATML, "<|im_start|>assistant\n<think>\n", "<|im_end|>"),
    "qwen3-0.6b.jinja": (CHATML, "<|im_start|>assistant\n", "<|im_end|>"),
    "qwen2.5-7b-instruct.jinja": (CHATML, "<|im_start|>assistant\n", "<|im_end|>"),
    "llama-3.1-8b-instruct.jinja": (LLAMA, "<|start_header_id|>assistant<|end_header_id|>\n\n",
                                    "<|eot_id|>"),
}

PROMPT = [{"role": "user", "content": "What is 2 + 2?\n\nPut the answer in \\boxed{}."}]
REASONING = "2 and 2 make 4.\nCheck: 4 - 2 = 2."
ANSWER = "The answer is \\boxed{4}."
# The two forms a stored trace comes in: with its opening tag (select's stored form, an R1
# teacher prompted without <think>) and without (the teacher's prompt opened it).
FORMS = {"tagged": f"<think>\n{REASONING}\n</think>\n\n{ANSWER}",
         "opened": f"{REASONING}\n</think>\n\n{ANSWER}"}


def real_tokenizer(name: str):
    """A tiny byte-level tokenizer with the special tokens, BOS / EOS and chat template of the
    model family `name` ships."""
    from pipeline.apps.tiny_model import build_tokenizer

    family = FAMILIES[name][0]
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": family["special"] + [family["eos"]]
                            + ([family["bos"]] if family["bos"] else [])})
    tok.eos_token = family["eos"]
    if family["bos"]:
        tok.bos_token = family["bos"]
    with open(os.path.join(TEMPLATES, name), encoding="utf-8") as f:
        tok.chat_template = f.read()
    return tok


def expected_target(generation_prompt: str, stop: str) -> str:
    opened = generation_prompt.endswith("<think>\n")
    return ("" if opened else "<think>\n") + f"{REASONING}\n</think>\n\n{ANSWER}{stop}"


def test_every_real_template_is_covered():
    assert sorted(FAMILIES) == sorted(f for f in os.listdir(TEMPLATES) if f.endswith(".jinja"))


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_sft_and_pair_targets_are_what_the_model_generates(name, form):
    from stages.lib.chat import end_of_turn, generation_prompt, target_format, target_texts
    from stages.lib.packed import encode

    tok = real_tokenizer(name)
    _, gen, stop = FAMILIES[name]
    assert generation_prompt(tok, "", name, "sft.student") == gen
    assert end_of_turn(tok) == stop
    fmt = target_format(tok, name, "", "chat", "think", "sft.student")
    # sft rows and redi pairs: encode, what both stages tokenize every side with
    prompt_ids, target_ids = encode(tok, PROMPT, FORMS[form], fmt)
    assert tok.decode(prompt_ids).endswith(gen)
    assert tok.decode(target_ids) == expected_target(gen, stop)
    assert target_ids[-1] == tok.convert_tokens_to_ids(stop)
    # the reasoning survives: R1-Distill's template would have dropped it
    assert REASONING in tok.decode(target_ids)
    # the DPO / SimPO baselines get the same texts (TRL's text form)
    prompt, target, _ = target_texts(tok, PROMPT, FORMS[form], fmt)
    assert tok(prompt, add_special_tokens=False)["input_ids"] == prompt_ids
    assert target == expected_target(gen, stop)


def test_r1_distill_template_would_have_dropped_the_reasoning():
    """What the old code did: re-render the finished assistant message through the template."""
    tok = real_tokenizer("deepseek-r1-distill.original.jinja")
    full = tok.apply_chat_template(PROMPT + [{"role": "assistant", "content": FORMS["tagged"]}],
                                   tokenize=False)
    assert REASONING not in full and ANSWER in full


def test_thought_tags_sky_t1_form():
    from stages.lib.chat import split_think, target_format, target_texts, trace_text

    tok = real_tokenizer("qwen2.5-7b-instruct.jinja")
    stored = ("<|begin_of_thought|>\n\nstep one\n\nstep two\n\n<|end_of_thought|>\n\n"
              "<|begin_of_solution|>\n\n\\boxed{4}\n\n<|end_of_solution|>")
    assert split_think(stored, "thought") == ("step one\n\nstep two", "\\boxed{4}")
    assert trace_text("step one\n\nstep two", "\\boxed{4}", "thought") == stored
    fmt = target_format(tok, "qwen", "", "chat", "thought", "sft.student")
    _, target, _ = target_texts(tok, PROMPT, stored, fmt)
    assert target == stored + "<|im_end|>"


def test_traces_without_tags_and_raw_prompts_keep_working(tiny_model):
    from transformers import AutoTokenizer

    from stages.lib.chat import target_format
    from stages.lib.packed import encode

    tok = AutoTokenizer.from_pretrained(tiny_model)
    fmt = target_format(tok, tiny_model, "", "raw", "think", "sft.student")
    p, c = encode(tok, PROMPT, "just \\boxed{4}", fmt)
    assert tok.decode(p) == PROMPT[0]["content"]
    assert tok.decode(c) == "just \\boxed{4}" + tok.eos_token
    # a raw R1-style prompt that opens the reasoning itself: the target starts inside it
    opened = [{"role": "user", "content": "Solve 2 + 2. Assistant: <think>\n"}]
    _, c = encode(tok, opened, FORMS["tagged"], fmt)
    assert tok.decode(c) == f"{REASONING}\n</think>\n\n{ANSWER}{tok.eos_token}"


def test_unbalanced_tags_are_counted_never_a_crash():
    from stages.lib.chat import split_think, tag_status, trace_text

    unclosed = "<think>\nstill thinking when the budget ran out"
    assert split_think(unclosed) == ("still thinking when the budget ran out", "")
    assert tag_status(unclosed) == "unclosed"
    assert tag_status(FORMS["opened"]) == "closed" and tag_status("4") == "none"
    # an unclosed trace is all reasoning; its stored form closes it (nothing is lost)
    assert trace_text(*split_think(unclosed)) == \
        "<think>\nstill thinking when the budget ran out\n</think>\n\n"


def test_template_without_a_generation_prompt_is_exit_2_naming_model_and_template():
    from stages.lib.chat import generation_prompt, target_format

    tok = real_tokenizer("qwen2.5-7b-instruct.jinja")
    no_prompt = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(UserError, match=r"sft.student /m/qwen: its chat_template override has "
                                        r"no generation prompt"):
        generation_prompt(tok, no_prompt, "/m/qwen", "sft.student")
    with pytest.raises(UserError, match="reasoning_tags: 'xml' is not one of"):
        target_format(tok, "/m/qwen", "", "chat", "xml", "sft.student")


def test_template_without_generation_prompt_is_exit_2_from_the_cli(tmp_path, tiny_model):
    """The driver's check (before Ray starts) names the model and the template; exit 2."""
    from test_sft import write_select

    data_root = str(tmp_path / "data")
    write_select(data_root, n=4)
    bad = tmp_path / "no-prompt.jinja"
    bad.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "sft", "--recipe",
                           os.path.join(ROOT, "configs", "tiny.yaml"), f"data_root={data_root}",
                           f"student={tiny_model}", f"sft.chat_template={bad}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "sft.student" in done.stderr and tiny_model in done.stderr
    assert "no generation prompt" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_provenance_scores_each_model_on_its_own_form(name, tiny_model):
    """score_traces: the scored tokens are the target's (reasoning + close + answer + stop),
    their log-probs equal a direct transformers forward of prompt + target, and the offsets
    map back onto the stored trace's reasoning and answer."""
    import torch
    from transformers import AutoModelForCausalLM

    from stages.lib.chat import target_format, target_texts
    from stages.lib.packed import register_attention, ATTENTION, score_traces

    tok = real_tokenizer(name)
    register_attention()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=ATTENTION)
    model.resize_token_embeddings(len(tok))
    model.eval()
    _, gen, stop = FAMILIES[name]
    fmt = target_format(tok, name, "", "chat", "think", "provenance.student")
    traces = [FORMS["opened"], FORMS["tagged"]]
    with torch.no_grad():
        scored = score_traces(model, tok, [PROMPT, PROMPT], traces, fmt, 4096, 4096)
    for trace, entry in zip(traces, scored):
        prompt, target, _ = target_texts(tok, PROMPT, trace, fmt)
        assert prompt.endswith(gen) and target == expected_target(gen, stop)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        t_ids = tok(target, add_special_tokens=False)["input_ids"]
        assert len(entry["logps"]) == len(t_ids)
        with torch.no_grad():
            eager = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager")
            eager.resize_token_embeddings(len(tok))
            eager.load_state_dict(model.state_dict())  # the same (randomly) grown embeddings
            logits = eager(torch.tensor([p_ids + t_ids])).logits[0].float()
        direct = torch.log_softmax(logits, -1)[len(p_ids) - 1:-1].gather(
            1, torch.tensor(t_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(entry["logps"]), direct, atol=1e-4)
        # every scored character range lies inside the stored trace, on its own text: the
        # reasoning, the answer, and the tags both the target and the trace have
        pieces = [trace[a:b] for a, b in entry["offsets"] if b > a]
        opening = "<think>" if "<think>" in trace and target.startswith("<think>") else ""
        assert "".join(pieces) == opening + REASONING + "</think>" + ANSWER
        assert all(0 <= a <= b <= len(trace) for a, b in entry["offsets"])
        assert all(p[1] <= q[0] for p, q in zip(entry["offsets"], entry["offsets"][1:]))


# --- end to end: train on an R1-Distill template, sample with vLLM, it reasons and stops --------

VLLM_SAMPLE = r"""
import json, os, sys
os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0-1"
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
tok = llm.get_tokenizer()
prompt = tok.apply_chat_template(json.loads(sys.argv[2]), tokenize=False, add_generation_prompt=True)
out = llm.generate([{"prompt_token_ids": tok.encode(prompt, add_special_tokens=False)}],
                   SamplingParams(temperature=0, max_tokens=120,
                                  skip_special_tokens=False))[0].outputs[0]
print("SAMPLE " + json.dumps({"text": out.text, "finish": out.finish_reason,
                              "stop": out.stop_reason, "tokens": list(out.token_ids)}))
sys.stdout.flush()
llm.llm_engine.engine_core.shutdown()
os._exit(0)
"""


@pytest.mark.slow
def test_r1_distill_student_trained_by_sft_reasons_then_stops_in_vllm(tmp_path, ray_cluster):
    """The later R1-Distill template opens <think> in the generation prompt. A tiny student
    trained by the real sft stage on such targets, sampled greedily by vLLM with the same
    template, writes the reasoning, closes it, answers and stops on <｜end▁of▁sentence｜>."""
    from pipeline.config import load_recipe
    from pipeline.runner import run_stage
    from pipeline.apps.tiny_model import build_tiny_model, save_model
    from stages import STAGES
    from test_sft import write_select
    from transformers import AutoModelForCausalLM

    name = "deepseek-r1-distill.later.jinja"
    student = str(tmp_path / "r1-student")
    build_tiny_model(student, layers=2)
    tok = real_tokenizer(name)
    model = AutoModelForCausalLM.from_pretrained(student)
    model.resize_token_embeddings(len(tok))
    model.config.eos_token_id = tok.eos_token_id
    save_model(model, tok, student)

    def short_trace(a, b, steps, answer):  # one reasoning line: learnt in ~60 steps
        return f"<think>\nstep 0: {a} + {b} = {answer}\n</think>\n\\boxed{{{answer}}}"

    data_root = str(tmp_path / "data")
    write_select(data_root, n=16, trace=short_trace)
    # 16 samples of ~40 tokens fit one 1,024-token row per worker: one step per epoch
    recipe = load_recipe(os.path.join(ROOT, "configs", "tiny.yaml"), [
        f"data_root={data_root}", f"student={student}", "sft.epochs=80",
        "sft.tokens_per_step=2048", "sft.max_length=512", "sft.learning_rate=0.003",
        "sft.warmup_ratio=0.05", "sft.save_steps=0", "sft.report_to=none"], STAGES)
    version = run_stage("sft", recipe)
    gen = json.load(open(os.path.join(version.path, "generation_config.json")))
    eos_ids = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert tok.convert_tokens_to_ids(R1["eos"]) in eos_ids

    env = dict(os.environ, TMPDIR=str(tmp_path))
    env.pop("RAY_ADDRESS", None)
    question = [{"role": "user", "content": "Compute 12 + 30."}]
    done = subprocess.run([sys.executable, "-c", VLLM_SAMPLE, version.path, json.dumps(question)],
                          env=env, capture_output=True, text=True, timeout=300)
    lines = [l for l in done.stdout.splitlines() if l.startswith("SAMPLE ")]
    assert lines, done.stdout[-2000:] + done.stderr[-3000:]
    sample = json.loads(lines[0][len("SAMPLE "):])
    # the prompt opened <think>: the student writes reasoning lines, closes, answers, stops
    assert sample["text"].startswith("step 0: ") and "<think>" not in sample["text"]
    assert "</think>" in sample["text"] and "\\boxed{" in sample["text"].split("</think>")[1]
    assert sample["finish"] == "stop"
    assert sample["tokens"][-1] == tok.convert_tokens_to_ids(R1["eos"])


def test_real_r1_distill_completions_through_provenance_scoring(tiny_model):
    """Real DeepSeek-R1-Distill-Qwen-32B completions (no opening tag, ~2k tokens, markdown and
    LaTeX) scored as provenance does: the teacher in the R1-Distill form its prompt opened, the
    student in Qwen2.5-Instruct's form (it writes the opening tag), both mapped onto the stored
    text, every sentence of a fully scored trace scored by both."""
    import torch
    from transformers import AutoModelForCausalLM

    from stages.lib.chat import target_format, target_texts
    from stages.lib.packed import ATTENTION, register_attention, score_traces
    from stages.provenance import trace_columns
    from test_real_traces import r1_tasks

    register_attention()
    tasks = [t for t in r1_tasks() if "</think>" in t["completion"]][:6]
    traces = [t["completion"] for t in tasks]
    messages = [[{"role": "user", "content": t["question"]}] for t in tasks]
    scored = {}
    for role, name in (("teacher", "deepseek-r1-distill.later.jinja"),
                       ("student", "qwen2.5-7b-instruct.jinja")):
        tok = real_tokenizer(name)
        model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=ATTENTION)
        model.resize_token_embeddings(len(tok))
        fmt = target_format(tok, name, "", "chat", "think", f"provenance.{role}")
        with torch.inference_mode():
            scored[role] = score_traces(model, tok, messages, traces, fmt, 16384, 16384)
        for m, trace, entry in zip(messages, traces, scored[role]):
            _, target, _ = target_texts(tok, m, trace, fmt)
            assert target.startswith("<think>\n") == (role == "student")
            assert len(entry["logps"]) == len(tok(target, add_special_tokens=False)["input_ids"])
            assert not entry["truncated"]
    for trace, t, s in zip(traces, scored["teacher"], scored["student"]):
        row = trace_columns(trace, t, s, beta=0.1)
        assert len(row["sentence_spans"]) > 10
        assert "unscored" not in row["sentence_labels"]
        assert row["lp_teacher"] is not None and row["lp_student"] is not None
