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
