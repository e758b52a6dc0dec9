"""LaTeX text helpers shared by the stages that read answers (prompts' references, verify's
predictions)."""
from __future__ import annotations

import re

_BRACE = re.compile(r"[{}]")


def matching_braces(text: str) -> dict[int, int]:
    """{index of '{': index of its '}'} for every closed brace (escaped ones count too): one
    pass with a stack, linear in the text whatever the nesting."""
    closes, stack = {}, []
    for m in _BRACE.finditer(text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            closes[stack.pop()] = m.start()
    return closes
