"""Sentences of a reasoning trace and their provenance labels — shared by `provenance` and
`attribution` (a stage file is a stage, not a library for other stages: what both use lives here).

    split_sentences(text) -> [(start, end)]      character spans, whitespace trimmed
    sentence_means(spans, token_offsets, token_logps) -> [mean log-prob or None] per sentence
    scored_end / completion_mean: the per-token mean over the prefix every model scored
    label_two(p_t, p_s, beta) -> "teacher" | "student" | "common"          (before training)
    label_four(p_t, p_s, p_d, alpha, beta) -> + "shared" | "boosted"       (a distilled student)

docs/methods.md, "Provenance": a sentence's score under a model is the geometric mean of its
tokens' probabilities in context, p = exp(mean log p_k). It is a per-sentence mean, so two models
with different tokenizers compare through character spans: each model's tokens are mapped to
the sentences they overlap by their character offsets.

The splitter (the paper uses an unpublished regex; ours, documented in docs/provenance.md):
  - breaks at every newline, and after . ! ? (plus closing quotes/brackets) when whitespace and
    then a character that is not a lowercase letter follow;
  - never breaks inside math ($…$, $$…$$, \\(…\\), \\[…\\]) or code (`…`, ```…```) — a display
    block spanning lines stays one sentence;
  - keeps decimals (3.14: no whitespace after the point), enumeration markers ("1.", "a.", "iv.")
    at the start of a line or right after a sentence end, and common abbreviations (e.g., i.e., Dr., etc., vs., Fig., Eq.)
    inside their sentence;
  - a text with no boundary is one sentence; an empty or blank text has none.
"""
from __future__ import annotations

import bisect
import math
import re

# Regions where nothing is a boundary: fenced code, display and inline math, inline code.
_PROTECTED = re.compile(r"```.*?```|\$\$.*?\$\$|\\\[.*?\\\]|\\\(.*?\\\)|\$[^$\n]+\$|`[^`\n]+`",
                        re.S)
# A sentence end: terminal punctuation, then closing quotes/brackets, then whitespace or the end.
_END = re.compile(r"[.!?]+[\"'’”)\]]*(?=\s|$)")
ABBREVIATIONS = frozenset(
    "e.g i.e etc vs cf al approx resp dr mr mrs ms prof st no fig figs eq eqs sec ch vol "
    "p pp ex def thm lem cor prop".split())
# An enumeration marker alone at the start of a line: "1." "12." "a." "iv."
_MARKER = re.compile(r"(\d{1,3}|[A-Za-z]|[ivxlcIVXLC]{1,5})")


def split_sentences(text: str) -> list[tuple[int, int]]:
    """[start, end) character spans of the sentences of `text` (see the module docstring)."""
    protected = [(m.start(), m.end()) for m in _PROTECTED.finditer(text)]
    starts = [a for a, _ in protected]

    def inside(pos: int) -> bool:
        """Whether position `pos` lies strictly inside a protected region."""
        k = bisect.bisect_right(starts, pos) - 1
        return k >= 0 and protected[k][0] < pos < protected[k][1]

    cuts = [i + 1 for i, ch in enumerate(text) if ch == "\n" and not inside(i)]
    for m in _END.finditer(text):
        if inside(m.start()):
            continue
        line_start = text.rfind("\n", 0, m.start()) + 1
        before = text[line_start:m.start()]
        word = before.split()[-1] if before.split() else ""
        if m.group(0).startswith(".") and len(m.group(0).rstrip("\"'’”)]")) == 1:
            # e.g. / i.e.: the word before the last point is "e.g"; Dr. -> "dr"
            if word.lower().lstrip("(\"'") in ABBREVIATIONS:
                continue
            lead = before.rstrip()[:-len(word)].rstrip() if word else ""
            if _MARKER.fullmatch(word) and (not lead or lead[-1] in ".!?:;"):
                continue  # "1. First, …" starting a line or right after a sentence
        rest = text[m.end():]
        nxt = rest.lstrip(" \t")
        if nxt and nxt[0].islower():
            continue  # "… x = 5. then …": not a new sentence
        cuts.append(m.end())
    spans, prev = [], 0
    for cut in sorted(set(cuts)) + [len(text)]:
        a, b = prev, cut
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if b > a:
            spans.append((a, b))
        prev = cut
    return spans


def sentence_means(spans, offsets, logps) -> list[float | None]:
    """Mean token log-prob per sentence: the tokens whose [start, end) overlaps the span.

    offsets: [(start, end)] characters of each scored token, in text order (a tokenizer's offset
      mapping); logps: their log-probs. A token across a boundary counts in both sentences; a
      sentence no scored token reaches (past a truncation) gets None.
    """
    ends = [b for _, b in offsets]
    begins = [a for a, _ in offsets]
    cum = [0.0]
    for lp in logps:
        cum.append(cum[-1] + lp)
    out = []
    for s, e in spans:
        lo = bisect.bisect_right(ends, s)    # first token ending after the sentence starts
        hi = bisect.bisect_left(begins, e)   # first token starting at or after its end
        out.append((cum[hi] - cum[lo]) / (hi - lo) if hi > lo else None)
    return out


def scored_end(scored: dict, text_len: int) -> int:
    """Characters of the text a model scored: all of it, or up to its last scored token.
    scored: {"offsets", "logps", "truncated"} (stages/lib/packed.py's score_completions)."""
    if not scored["truncated"]:
        return text_len
    return scored["offsets"][len(scored["logps"]) - 1][1] if scored["logps"] else 0


def completion_mean(scored: dict, common_end: int) -> float | None:
    """Mean log-prob of a model's tokens that end within the first common_end characters (the
    prefix every model scored: truncation cuts different tokenizers at different characters)."""
    logps = [lp for (a, b), lp in zip(scored["offsets"], scored["logps"]) if b <= common_end]
    return sum(logps) / len(logps) if logps else None


def geometric_p(mean_logp: float | None) -> float | None:
    """p = exp(mean log p_k), the sentence's geometric-mean token probability."""
    return None if mean_logp is None else math.exp(mean_logp)


def label_two(p_t: float | None, p_s: float | None, beta: float) -> str:
    """Before training: teacher if p_T - p_S > beta, student if p_S - p_T > beta, else common.
    "unscored" when either model scored no token of the sentence (cut by max_length)."""
    if p_t is None or p_s is None:
        return "unscored"
    if p_t - p_s > beta:
        return "teacher"
    if p_s - p_t > beta:
        return "student"
    return "common"


def label_four(p_t, p_s, p_d, alpha: float, beta: float) -> str:
    """With a distilled student D (docs/methods.md): shared if all three pairwise differences are
    <= alpha; teacher if p_T - p_S > beta; student if p_S - p_T > beta; otherwise boosted."""
    if p_t is None or p_s is None or p_d is None:
        return "unscored"
    if abs(p_s - p_d) <= alpha and abs(p_t - p_d) <= alpha and abs(p_t - p_s) <= alpha:
        return "shared"
    if p_t - p_s > beta:
        return "teacher"
    if p_s - p_t > beta:
        return "student"
    return "boosted"
