"""DAP's rewrite prompt (docs/methods.md, DAP): the judge frame and per-level outlines of a prompt
folder, filling it for one trace, and parsing the teacher's answer.

Shared by the prune stage (mode rewrite) and the built-in demo, which trains its tiny teacher on
exactly the prompts prune sends (pipeline/apps/demo.py, configs/dap-demo/).
"""
from __future__ import annotations

import os
import re

from pipeline.errors import UserError
from pipeline.textfile import read_text
from stages.lib.chat import split_think, trace_text

JUDGED = ("simple", "moderate", "complex")      # the teacher's levels in rewrite mode
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS_DIR = os.path.join(REPO, "configs", "dap")


def load_dap_prompts(folder: str) -> dict:
    """{"judge": frame, "simple": outline, "moderate": …, "complex": …} from the prompt folder."""
    prompts = {}
    for name in ("judge",) + JUDGED:
        path = os.path.join(folder, f"{name}.txt")
        if not os.path.exists(path):
            raise UserError(f"prune.prompts_dir: {path} not found (need judge.txt, simple.txt, "
                            "moderate.txt, complex.txt)")
        prompts[name] = read_text(path, "prune.prompts_dir").strip()  # BOM / CRLF are fine
    for slot in ("{problem}", "{trace}") + tuple("{%s}" % lvl for lvl in JUDGED):
        if slot not in prompts["judge"]:
            raise UserError(f"prune: {folder}/judge.txt has no {slot} placeholder")
    return prompts


def fill_dap_prompt(prompts: dict, problem: str, trace: str) -> str:
    values = {"problem": problem, "trace": trace, **{lvl: prompts[lvl] for lvl in JUDGED}}
    # One pass: braces inside the problem or the trace (LaTeX) are never substituted again.
    return re.sub(r"\{(problem|trace|simple|moderate|complex)\}", lambda m: values[m.group(1)],
                  prompts["judge"])


def parse_rewrite(text: str, tags: str = "think") -> tuple[str | None, str]:
    """(judged level or None, the rewrite in the stored form of `tags`, stages/lib/chat.py
    trace_text). The judge prompts ask for <think> tags, so that is how the answer is read."""
    m = re.search(r"difficulty\W{0,4}(simple|moderate|complex)", text[:300], re.IGNORECASE)
    level = m.group(1).lower() if m else None
    body = text[m.end():] if m else text
    reasoning, final = split_think(body[body.find("<think>"):] if "<think>" in body else body)
    return level, trace_text(reasoning, final, tags)
