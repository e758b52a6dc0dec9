"""How a problem becomes a chat, a completion becomes reasoning + answer, and a trace becomes
the text a model trains on and is scored on (its prompt, then the trace as it writes it).

One place for the conventions every stage shares: the user turn (open-r1's), the message list
sent to a model, the reasoning tags and their split, training / scoring targets, the trace id.
generate, prune, select, sft, redi, provenance and evaluate import these; a stage file is a
stage, not a library for other stages.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass

from pipeline.config import is_local_model
from pipeline.errors import UserError
from pipeline.textfile import read_text
from stages.lib.models import check_model

# The user turn open-r1 uses; evaluate defaults to the same so models are asked as the teacher was.
# "{problem}" is replaced literally (str.replace, not str.format): \boxed{} needs no escaping.
PROBLEM_TEMPLATE = ("{problem}\n\nPlease reason step by step, and put your final answer "
                    "within \\boxed{}.")


def trace_id(problem_id: str, teacher: str, sample_idx: int, seed: int) -> str:
    blob = json.dumps([problem_id, teacher, sample_idx, seed]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------- reasoning tags
# One setting for every stage that splits reasoning from answer: the recipe's top-level
# `reasoning_tags` (filled into each stage's field of that name, as `teacher` is).
#   think:   DeepSeek-R1, QwQ, Qwen3, R1-Distill:  <think>\n…\n</think>\n\nanswer
#   thought: Sky-T1, Bespoke-Stratos, OpenThoughts:
#            <|begin_of_thought|>\n\n…\n\n<|end_of_thought|>\n\n
#            <|begin_of_solution|>\n\nanswer\n\n<|end_of_solution|>


@dataclass(frozen=True)
class Tags:
    open: str                 # opens the reasoning
    close: str                # closes it
    answer_open: str = ""     # wraps the final answer, when the format has such tags
    answer_close: str = ""
    pad: str = "\n"           # what sits between a tag and the text it wraps


REASONING_TAGS = {
    "think": Tags("<think>", "</think>"),
    "thought": Tags("<|begin_of_thought|>", "<|end_of_thought|>",
                    "<|begin_of_solution|>", "<|end_of_solution|>", pad="\n\n"),
}


def reasoning_tags(name: str, where: str) -> Tags:
    if name not in REASONING_TAGS:
        raise UserError(f"{where}.reasoning_tags: '{name}' is not one of {sorted(REASONING_TAGS)}")
    return REASONING_TAGS[name]


def split_think(completion: str, tags: str = "think") -> tuple[str, str]:
    """(reasoning, final) of a completion, whichever way it marked its reasoning:
    both tags; only the closing one (the generation prompt opened it: R1-Distill's later template,
    QwQ); an unclosed opening tag (a truncated sample) is all reasoning; no tags at all is all
    final answer. Answer tags (`thought`'s `<|begin_of_solution|>`) are taken off the answer."""
    t = REASONING_TAGS[tags]
    if t.close in completion:
        reasoning, final = completion.split(t.close, 1)
        reasoning = reasoning.split(t.open, 1)[1] if t.open in reasoning else reasoning
    elif t.open in completion:
        reasoning, final = completion.split(t.open, 1)[1], ""
    else:
        reasoning, final = "", completion
    if t.answer_open and t.answer_open in final:
        final = final.split(t.answer_open, 1)[1]
    if t.answer_close:
        final = final.split(t.answer_close, 1)[0]
    return reasoning.strip(), final.strip()


def tag_status(completion: str, tags: str = "think") -> str:
    """"closed" (the reasoning ends with its closing tag), "unclosed" (opened, never closed: all
    reasoning, counted by generate) or "none" (no reasoning tags: all answer)."""
    t = REASONING_TAGS[tags]
    if t.close in completion:
        return "closed"
    return "unclosed" if t.open in completion else "none"


def trace_text(reasoning: str, final: str, tags: str = "think") -> str:
    """The stored form of a trace (select's assistant message, what the viewer shows): both
    reasoning tags, then the answer. No reasoning: the answer alone."""
    t = REASONING_TAGS[tags]
    answer = f"{t.answer_open}{t.pad}{final}{t.pad}{t.answer_close}" if t.answer_open else final
    if not reasoning:
        return answer
    return f"{t.open}{t.pad}{reasoning}{t.pad}{t.close}\n\n{answer}"


def opened_reasoning(prompt_text: str, tags: str = "think") -> str:
    """The part of the opening tag (with its pad) the prompt ends with: "<think>\n" when the
    generation prompt opened the reasoning (R1-Distill's later template, QwQ), else "". A
    completion after such a prompt is `opened + completion` in full: a sample cut inside its
    reasoning has no tag at all, and is still all reasoning."""
    opening = REASONING_TAGS[tags].open + REASONING_TAGS[tags].pad
    for k in range(len(opening), 0, -1):  # "<think>\n" or "<think>" ends the prompt
        if prompt_text.endswith(opening[:k]) and opening[:k].strip():
            return opening[:k]
    return ""


def generation_target(prompt_text: str, reasoning: str, final: str, tags: str,
                      end_of_turn: str) -> tuple[str, list[tuple[int, int, str]]]:
    """What a model writes after `prompt_text` for this trace, and where its parts lie in it.

    The model's own form: it opens the reasoning tag unless the generation prompt already did
    (then the text starts inside the reasoning), closes it, writes the answer and stops with
    `end_of_turn`. Never the template's rendering of a finished assistant message: templates
    rewrite those (R1-Distill's keeps only `content.split('</think>')[-1]`).

    Returns (text, [(start, end, part)]) with part "reasoning" / "final": the character
    ranges of the trace's two texts, so scores of its tokens map back onto them.
    """
    t = REASONING_TAGS[tags]
    opening = t.open + t.pad
    opened = opened_reasoning(prompt_text, tags)
    answer_head = f"{t.answer_open}{t.pad}" if t.answer_open else ""
    answer_tail = f"{t.pad}{t.answer_close}" if t.answer_open else ""
    parts: list[tuple[str, str]] = []
    if reasoning or opened:
        parts += [("", opening[len(opened):]), ("reasoning", reasoning),
                  ("", f"{t.pad}{t.close}\n\n")]
    parts += [("", answer_head), ("final", final), ("", answer_tail + end_of_turn)]
    text, spans = "", []
    for part, piece in parts:
        if part:
            spans.append((len(text), len(text) + len(piece), part))
        text += piece
    return text, spans


def end_of_turn(tokenizer, chat_template: str = "", prompt_format: str = "chat") -> str:
    """The token that ends the model's turn: what its template writes right after an assistant
    message (`<|im_end|>`, `<｜end▁of▁sentence｜>`, `<|eot_id|>`), else the tokenizer's EOS (raw
    prompts, a template that writes nothing there). sft saves it as the student's stop token, so
    vLLM stops where training ended the target."""
    eos = tokenizer.eos_token or ""
    if prompt_format == "raw":
        return eos
    marker = "\x00distillery-answer\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "u"}, {"role": "assistant", "content": marker}],
        chat_template=chat_template or None, tokenize=False)
    after = text.split(marker, 1)[1] if marker in text else ""
    special = sorted({*tokenizer.all_special_tokens, *tokenizer.get_added_vocab()},
                     key=len, reverse=True)
    return next((s for s in special if s and after.startswith(s)), eos)


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


def load_tokenizer(model: str, where: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError/JSON errors here
        raise UserError(f"{where} {model}: its tokenizer does not load "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def generation_prompt(tokenizer, chat_template: str, model: str, where: str) -> str:
    """What the template appends for `add_generation_prompt` (`<|im_start|>assistant\n`,
    `<｜Assistant｜><think>\n`): the text a target starts after. A template that appends nothing,
    or whose prompt is not its rendering of the messages plus something, cannot say where the
    model's turn starts: a UserError naming the model and the template."""
    messages = [{"role": "user", "content": "u"}]
    render = functools.partial(tokenizer.apply_chat_template, messages, tokenize=False,
                               chat_template=chat_template or None)
    bare, prompt = render(add_generation_prompt=False), render(add_generation_prompt=True)
    which = "its chat_template override" if chat_template else "its own chat template"
    if not prompt.startswith(bare) or prompt == bare:
        raise UserError(f"{where} {model}: {which} has no generation prompt that can be found "
                        "in its own rendering (the prompt with add_generation_prompt is not the "
                        "conversation plus an assistant header), so the model's turn has no "
                        "start; set chat_template to one that has, or prompt_format=raw")
    return prompt[len(bare):]


def check_chat_format(model: str, chat_template: str, prompt_format: str, stage: str,
                      role: str = "teacher") -> str:
    """Check in the driver, before Ray starts, that `model` can be prompted this way; returns
    the template text to hand to workers ("" = the model's own). `role`: the config field that
    names the model (teacher, student, a model of evaluate's list)."""
    if prompt_format not in PROMPT_FORMATS:
        raise UserError(f"{stage}.prompt_format: '{prompt_format}' is not one of {PROMPT_FORMATS}")
    template = load_chat_template(chat_template, f"{stage}.chat_template")
    check_model(model, f"{stage}.{role}")
    if prompt_format == "chat" and not template and is_local_model(model):
        tokenizer = load_tokenizer(model, f"{stage}.{role}")
        if not tokenizer.chat_template:
            raise UserError(
                f"{stage}.{role} {model}: the model has no chat template (a base model?): set "
                f"{stage}.chat_template=<a .jinja file or Jinja text> or "
                f"{stage}.prompt_format=raw (the problem template is the whole prompt)")
    if prompt_format == "chat" and is_local_model(model):
        generation_prompt(load_tokenizer(model, f"{stage}.{role}"), template, model,
                          f"{stage}.{role}")
    return template


def render_prompt(tokenizer, messages: list[dict], chat_template: str = "",
                  prompt_format: str = "chat") -> str:
    """The text a model is prompted with for `messages` (see the block comment above)."""
    if prompt_format == "raw":
        bos = tokenizer.decode(tokenizer("", add_special_tokens=True)["input_ids"])
        return bos + "\n\n".join(m["content"] for m in messages)
    return tokenizer.apply_chat_template(messages, chat_template=chat_template or None,
                                         tokenize=False, add_generation_prompt=True)



@dataclass(frozen=True)
class TargetFormat:
    """How one model's training and scoring texts are built (`target_format` makes it once per
    model and stage; `target_texts` applies it to a trace)."""

    chat_template: str        # "" = the model's own
    prompt_format: str        # "chat" | "raw"
    tags: str                 # a key of REASONING_TAGS
    end_of_turn: str          # the model's stop token (end_of_turn)


def target_format(tokenizer, model: str, chat_template: str, prompt_format: str, tags: str,
                  where: str) -> TargetFormat:
    """The format for `model` (named in errors as `where`, e.g. "sft.student"): checks the tags
    setting and that the template has a generation prompt (hub models too: check_chat_format
    checks local ones before Ray starts)."""
    reasoning_tags(tags, where.split(".")[0])
    if prompt_format == "chat":
        generation_prompt(tokenizer, chat_template, model, where)
    return TargetFormat(chat_template, prompt_format, tags,
                        end_of_turn(tokenizer, chat_template, prompt_format))


def target_texts(tokenizer, messages: list[dict], trace: str, fmt: TargetFormat):
    """(prompt text, target text, spans): the model's rendered prompt with its generation
    prompt, and the trace (any marking split_think reads) as that model writes it after that
    prompt (generation_target: spans locate the reasoning and the answer in the target)."""
    prompt = render_prompt(tokenizer, messages, fmt.chat_template, fmt.prompt_format)
    reasoning, final = split_think(trace, fmt.tags)
    target, spans = generation_target(prompt, reasoning, final, fmt.tags, fmt.end_of_turn)
    return prompt, target, spans
