"""A base model (no chat template) as teacher or student: `chat_template` / `prompt_format`.

Before: generate started Ray and an engine, then apply_chat_template raised inside the actor:
exit 1 and a Ray traceback. Now: exit 2 before Ray starts, naming the model and both options;
with `prompt_format=raw` or a `chat_template` file it runs, for real, on vLLM.
"""
from __future__ import annotations

import os
import shutil

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.store import MANIFEST

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


def strip_template(model: str, out: str) -> str:
    """A copy of `model` without any chat template: what a base model looks like."""
    import json

    shutil.copytree(model, out)
    if os.path.exists(os.path.join(out, "chat_template.jinja")):
        os.remove(os.path.join(out, "chat_template.jinja"))
    path = os.path.join(out, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    config.pop("chat_template", None)
    with open(path, "w") as f:
        json.dump(config, f)
    return out


@pytest.fixture(scope="module")
def base_model(tiny_model, tmp_path_factory):
    from transformers import AutoTokenizer

    path = strip_template(tiny_model, str(tmp_path_factory.mktemp("base") / "base"))
    assert AutoTokenizer.from_pretrained(path).chat_template is None
    return path


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, base_model):
    root = str(tmp_path_factory.mktemp("chat") / "data")
    assert main(["run", "prompts", "--recipe", os.path.join(REPO, "configs/tiny.yaml"),
                 f"data_root={root}", "prompts.synthetic_n=4"]) == 0
    return root


def generate(data_root, base_model, *extra):
    return main(["run", "generate", "--recipe", os.path.join(REPO, "configs/tiny.yaml"),
                 f"data_root={data_root}", f"teacher={base_model}", "generate.n=2",
                 "generate.max_tokens=8", *extra])


def test_base_model_without_options_is_exit_2_before_ray(data_root, base_model, capsys):
    import ray

    ray_before = ray.is_initialized()  # another module's session Ray may be up already
    assert generate(data_root, base_model) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert base_model in err and "no chat template" in err
    assert "generate.chat_template" in err and "generate.prompt_format=raw" in err
    # Answered before Ray started: none started here, and no shard was planned.
    assert ray.is_initialized() == ray_before and "problems in" not in out
    assert not os.path.isdir(os.path.join(data_root, "generate")) or not any(
        os.path.exists(os.path.join(data_root, "generate", v, MANIFEST))
        for v in os.listdir(os.path.join(data_root, "generate")))


def test_bad_chat_template_values_are_exit_2(data_root, base_model, tmp_path, capsys):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content }")
    assert generate(data_root, base_model, f"generate.chat_template={bad}") == 2
    err = capsys.readouterr().err
    assert "generate.chat_template" in err and "line 1" in err and "Traceback" not in err
    assert generate(data_root, base_model, "generate.chat_template=missing.jinja") == 2
    assert "missing.jinja: file not found" in capsys.readouterr().err
    assert generate(data_root, base_model, "generate.prompt_format=plain") == 2
    assert "generate.prompt_format: 'plain'" in capsys.readouterr().err


def _version_rows(data_root: str, stage: str) -> list[dict]:
    latest = open(os.path.join(data_root, stage, "LATEST")).read().strip()
    return pq.read_table(os.path.join(data_root, stage, latest)).to_pylist()


def _manifest(data_root: str, stage: str) -> dict:
    import json

    latest = open(os.path.join(data_root, stage, "LATEST")).read().strip()
    return json.load(open(os.path.join(data_root, stage, latest, MANIFEST)))


def test_raw_prompt_and_template_file_run_on_vllm(data_root, base_model, tmp_path, ray_cluster):
    """Both runs share one module's Ray (the session fixture); each starts one tiny engine."""
    assert generate(data_root, base_model, "generate.prompt_format=raw") == 0
    rows = _version_rows(data_root, "generate")
    assert len(rows) == 4 * 2 and all(r["finish_reason"] in ("stop", "length") for r in rows)
    # Raw: the prompt is the problem template alone, tokenized as such.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model)
    user = rows[0]["prompt_messages"][-1]["content"]
    assert rows[0]["prompt_tokens"] == len(tok(user, add_special_tokens=False)["input_ids"])

    template = tmp_path / "qa.jinja"
    template.write_bytes(b"\xef\xbb\xbf" + TEMPLATE.replace("\n", "\r\n").encode())  # BOM + CRLF
    assert generate(data_root, base_model, f"generate.chat_template={template}") == 0
    rows = _version_rows(data_root, "generate")
    rendered = tok.apply_chat_template(rows[0]["prompt_messages"], chat_template=TEMPLATE,
                                       tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("user: ") and rendered.endswith("assistant:")
    assert rows[0]["prompt_tokens"] == len(tok(rendered, add_special_tokens=False)["input_ids"])

    # A generation prompt that opens the reasoning (R1-Distill's later template): the stored
    # turn starts with that tag, so a sample cut at max_tokens inside it is all reasoning.
    opening = tmp_path / "opens-think.jinja"
    opening.write_text(TEMPLATE.replace("assistant:", "assistant:<think>\n"))
    assert generate(data_root, base_model, f"generate.chat_template={opening}") == 0
    rows = _version_rows(data_root, "generate")
    assert all(r["completion"].startswith("<think>\n") for r in rows)
    for r in rows:
        if r["reasoning_status"] == "unclosed":
            assert r["final"] == "" and r["finish_reason"] == "length"
    stats = _manifest(data_root, "generate")["stats"]["reasoning_status"]
    assert sum(stats.values()) == len(rows) and set(stats) <= {"closed", "unclosed"}


def test_raw_format_training_rows_keep_the_prompt_as_a_prefix(base_model):
    """sft/redi's completion-only loss: the raw prompt's ids are a prefix of prompt + answer,
    and the answer ends with EOS (the model learns to stop)."""
    from transformers import AutoTokenizer

    from stages.lib.chat import check_chat_format, target_format
    from stages.lib.packed import encode

    tok = AutoTokenizer.from_pretrained(base_model)
    prompt = [{"role": "user", "content": "What is 2 + 2?\n\nPut the answer in \\boxed{}."}]
    answer = "<think>2 and 2</think> \\boxed{4}"
    raw = target_format(tok, base_model, "", "raw", "think", "sft.student")
    prompt_ids, completion_ids = encode(tok, prompt, answer, raw)
    assert tok.decode(prompt_ids) == prompt[0]["content"]
    assert tok.decode(completion_ids) == "<think>\n2 and 2\n</think>\n\n\\boxed{4}" + tok.eos_token
    with_template = encode(tok, prompt, answer,
                           target_format(tok, base_model, TEMPLATE, "chat", "think", "sft.student"))
    assert tok.decode(with_template[0]).endswith("assistant:")
    # sft refuses the base model without either knob, naming both.
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="sft.chat_template=.*sft.prompt_format=raw"):
        check_chat_format(base_model, "", "chat", "sft", "student")
    assert check_chat_format(base_model, "", "raw", "sft", "student") == ""
