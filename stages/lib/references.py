"""A problem file's reference answer, read the way its dataset writes it: GSM8K's "#### 2,125",
MATH's last \\boxed{} in a solution, AMC's float 27.0. prompts and evaluate read references the
same way (one definition)."""
from __future__ import annotations

import math
import re

from pipeline.errors import UserError
from stages.lib.latex import matching_braces

ANSWER_FROM = ("auto", "last_boxed", "field")

# The reference's last box. Not verify's extractor (stages/lib/answers.py): importing it would tie
# every prompts version to the checker's code, and a checker edit would then regenerate every trace.
# Reference solutions are well formed: braces balance, and a box's content is its braces'.
_REF_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
# "2,125", "1,450,000", "-1,234.5": GSM8K's thousands separators (14 of its test answers).
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def reference_box(text: str) -> str | None:
    """The content of the last closed \\boxed{...} / \\fbox{...} of a reference solution; None
    if none. Linear: the braces are matched once (a stack), whatever the number of boxes."""
    opens = [m.end() - 1 for m in _REF_BOX.finditer(text)]
    if not opens:
        return None
    closes = matching_braces(text)
    for i in reversed(opens):
        if i in closes:
            return text[i + 1:closes[i]].strip() or None
    return None


def reference_answer(value, where: str, field: str, answer_from: str = "auto") -> str | None:
    """The reference answer in a row's `field` value, read as `answer_from` says (see
    PromptsConfig); None when there is none."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UserError(f"{where}: field '{field}': expected text or a number, "
                        f"got {type(value).__name__}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UserError(f"{where}: field '{field}': {value} is not an answer")
        # 27.0 is the integer 27 (AMC23 stores every answer as a float): "27", not "27.0".
        text = str(int(value)) if value.is_integer() else repr(value)
    else:
        text = str(value)
    if answer_from == "field":
        return text.strip() or None
    if answer_from == "last_boxed" or (answer_from == "auto" and "####" not in text
                                       and _REF_BOX.search(text)):
        return reference_box(text)
    if "####" in text:  # GSM8K: the reference answer follows "####"
        text = text.rsplit("####", 1)[1].strip()
        if _THOUSANDS.fullmatch(text):
            text = text.replace(",", "")
    text = text.strip()
    return text or None
