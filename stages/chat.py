"""How a problem becomes a chat, and a completion becomes reasoning + answer.

One place for the conventions every stage shares: the user turn (open-r1's), the message list
sent to a model, the `<think>` split, and the trace id. generate, prune, select and evaluate
import these; a stage file is a stage, not a library for other stages.
"""
from __future__ import annotations

import hashlib
import json

# The user turn open-r1 uses; evaluate defaults to the same so models are asked as the teacher was.
# "{problem}" is replaced literally (str.replace, not str.format): \boxed{} needs no escaping.
PROBLEM_TEMPLATE = ("{problem}\n\nPlease reason step by step, and put your final answer "
                    "within \\boxed{}.")


def trace_id(problem_id: str, teacher: str, sample_idx: int, seed: int) -> str:
    blob = json.dumps([problem_id, teacher, sample_idx, seed]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def split_think(completion: str) -> tuple[str, str]:
    """(reasoning, final). `<think>…</think>` holds the reasoning; a template that opens `<think>`
    in the generation prompt leaves only `</think>` in the completion; an unclosed `<think>`
    (truncated sample) is all reasoning; no tags at all is all final answer."""
    if "</think>" in completion:
        reasoning, final = completion.split("</think>", 1)
        reasoning = reasoning.split("<think>", 1)[1] if "<think>" in reasoning else reasoning
        return reasoning.strip(), final.strip()
    if "<think>" in completion:
        return completion.split("<think>", 1)[1].strip(), ""
    return "", completion.strip()


def messages_type():
    import pyarrow as pa

    return pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def prompt_messages(problem: str, cfg) -> list[dict]:
    """The chat sent for one problem; `cfg` is any config with `system_prompt` and
    `problem_template` (generate's, evaluate's: both stages must ask the same way)."""
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    user = cfg.problem_template.replace("{problem}", problem)
    return messages + [{"role": "user", "content": user}]


# --------------------------------------------------------------------------- rendering a prompt
# Every stage that turns messages into model text (generate, prune's rewrite, sft, redi,
# evaluate, provenance) takes two knobs and calls the two functions below:
#
#   chat_template: "" = the model's own; else a Jinja string or a path to a .jinja file
#     (open-r1's recipes carry one for base models). A file is read in the driver and the text
#     travels to the workers, so a Ray node need not see the file.
#   prompt_format: "chat" (default) renders the messages with that template; "raw" makes the
#     problem template the whole prompt, no chat rendering (base models, R1-style raw prompts):
#     the messages' contents joined by a blank line, after the tokenizer's BOS when its encode
#     adds one. A raw training row is prompt text + completion text + EOS.
#
#     template = check_chat_format(model, cfg.chat_template, cfg.prompt_format, "generate")
#     ... then in the worker (after the tokenizer is loaded):
#     text = render_prompt(tokenizer, messages, template, cfg.prompt_format)
#
# check_chat_format runs in the driver before Ray starts: a model without a template and without
# either knob is a UserError naming the model and both options, not a Ray traceback.

PROMPT_FORMATS = ("chat", "raw")


def load_chat_template(chat_template: str, where: str) -> str:
    """The template text: "" stays "", an existing file (e.g. `tpl.jinja`) is read, a name that
    ends in .jinja but does not exist is an error, anything else is the Jinja text itself."""
    import os

    from pipeline.errors import UserError
    from pipeline.textfile import read_text

    if not chat_template:
        return ""
    if os.path.isfile(os.path.expanduser(chat_template)):
        text = read_text(os.path.expanduser(chat_template), where)
    elif "{{" not in chat_template and "{%" not in chat_template:  # no Jinja: meant as a file
        raise UserError(f"{where} {chat_template}: file not found (a chat template is a .jinja "
                        "file or Jinja text)")
    else:
        text = chat_template
    import jinja2
    # transformers' own compiler (its extensions: loop controls, {% generation %}), private but
    # the one apply_chat_template uses: a template that compiles here renders there.
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(text)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"{where}: line {e.lineno}: not a valid Jinja template ({e.message})") from None
    if not text.strip():
        raise UserError(f"{where}: the chat template is empty")
    return text


def check_model_files(model: str, where: str) -> None:
    """A local model folder loads: a config transformers reads, a causal LM, weights that are
    not truncated (safetensors header vs file size), a tokenizer. Hub ids are left to the
    loaders. UserError naming `where` (e.g. "generate.teacher") otherwise."""
    import glob
    import json
    import os
    import struct

    from pipeline.config import is_local_model
    from pipeline.errors import UserError

    if not model or not is_local_model(model):
        return
    path = os.path.expanduser(model)
    if not os.path.isdir(path):
        raise UserError(f"{where} {model}: no such model folder")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise UserError(f"{where} {model}: not a model folder (no config.json in it)")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{where} {model}: config.json does not load "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"{where} {model}: model type '{config.model_type}' is not a causal "
                        "language model (AutoModelForCausalLM cannot load it)")
    # BERT has a causal-LM head class too, but a checkpoint saved as BertForMaskedLM is an
    # encoder: vLLM and our trainer go by the saved architecture.
    generative = [a for a in config.architectures or [] if a.endswith(("ForCausalLM", "LMHeadModel"))]
    if config.architectures and not generative:
        raise UserError(f"{where} {model}: architectures {config.architectures} in config.json: "
                        "not a causal language model (expected e.g. Qwen2ForCausalLM)")
    for weights in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        size = os.path.getsize(weights)
        with open(weights, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            try:
                header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
            except ValueError:
                header = None
        if header is None:
            raise UserError(f"{where} {model}: {os.path.basename(weights)} is not a readable "
                            f"safetensors file ({size} bytes; truncated?)")
        end = 8 + n + max((t["data_offsets"][1] for k, t in header.items()
                           if k != "__metadata__"), default=0)
        if size < end:
            raise UserError(f"{where} {model}: {os.path.basename(weights)} is truncated "
                            f"({size} of {end} bytes)")
    if not glob.glob(os.path.join(path, "*.safetensors")) and not glob.glob(os.path.join(path, "*.bin")):
        raise UserError(f"{where} {model}: no weights in the folder (*.safetensors or *.bin)")


def load_tokenizer(model: str, where: str):
    from transformers import AutoTokenizer

    from pipeline.errors import UserError

    try:
        return AutoTokenizer.from_pretrained(model)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError/JSON errors here
        raise UserError(f"{where} {model}: its tokenizer does not load "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def check_chat_format(model: str, chat_template: str, prompt_format: str, stage: str,
                      role: str = "teacher") -> str:
    """Check in the driver, before Ray starts, that `model` can be prompted this way; returns
    the template text to hand to workers ("" = the model's own). `role`: the config field that
    names the model (teacher, student, a model of evaluate's list)."""
    from pipeline.config import is_local_model
    from pipeline.errors import UserError

    if prompt_format not in PROMPT_FORMATS:
        raise UserError(f"{stage}.prompt_format: '{prompt_format}' is not one of {PROMPT_FORMATS}")
    template = load_chat_template(chat_template, f"{stage}.chat_template")
    check_model_files(model, f"{stage}.{role}")
    if prompt_format == "chat" and not template and is_local_model(model):
        tokenizer = load_tokenizer(model, f"{stage}.{role}")
        if not tokenizer.chat_template:
            raise UserError(
                f"{stage}.{role} {model}: the model has no chat template (a base model?): set "
                f"{stage}.chat_template=<a .jinja file or Jinja text> or "
                f"{stage}.prompt_format=raw (the problem template is the whole prompt)")
    return template


def render_prompt(tokenizer, messages: list[dict], chat_template: str = "",
                  prompt_format: str = "chat") -> str:
    """The text a model is prompted with for `messages` (see the block comment above)."""
    if prompt_format == "raw":
        bos = tokenizer.decode(tokenizer("", add_special_tokens=True)["input_ids"])
        return bos + "\n\n".join(m["content"] for m in messages)
    return tokenizer.apply_chat_template(messages, chat_template=chat_template or None,
                                         tokenize=False, add_generation_prompt=True)


def render_conversation(tokenizer, messages: list[dict], completion: list[dict],
                        chat_template: str = "", prompt_format: str = "chat") -> str:
    """Prompt + answer (`completion`: the assistant message(s)) as one training text;
    render_prompt(...) is a prefix of it in "raw" format always, in "chat" format when the
    template is well-behaved (stages/packed.py's encode checks)."""
    if prompt_format == "raw":
        return (render_prompt(tokenizer, messages, chat_template, prompt_format)
                + "".join(m["content"] for m in completion) + (tokenizer.eos_token or ""))
    return tokenizer.apply_chat_template(messages + completion, chat_template=chat_template or None,
                                         tokenize=False)
