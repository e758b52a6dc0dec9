"""Answer extraction and checking with math-verify, shared by verify, prune's rewrite check and
evaluate: one reading of "what did this trace answer, and is it right".

Why a child process: math-verify bounds its own calls with SIGALRM, which only works in a main
thread and cannot interrupt C code — `verify(1, 10^{10^{10^{10}}})` sits inside CPython's bigint
power for hours with the GIL held. So each Ray worker sends its (trace text, reference) rows to a
child process (`Checker`), which extracts the answer and checks it, and SIGKILLs it when a row
overruns `timeout_s`; the next call gets a fresh child forked from a helper that has math-verify
imported and warmed up already (~15 ms, not a 1 s import). Children run under an address-space
cap (`memory_mib`), so a huge power fails ("error" or "timeout") instead of eating the machine's
memory.

Extraction: the last \\boxed{} of the text, then each of `fallbacks` in order — "the answer is
X", and then math-verify's own extraction (`math_verify.parse` with its default LaTeX + expression
configs) over the answer part, the text after the reasoning. So a trace that answers `$9$`,
`\\(9\\)`, "Final Answer: 18", `1,000.99`, `\\frac{10}{9}` or a bare number is graded as
math-verify grades it, and boxed traces keep our extraction (docs/performance.md: on
Qwen2.5-Math's MATH samples it matches the sources' labels on 799 of 800, stock math-verify on
747: a reference such as `10` is read as `\\boxed{10}`, not searched for its last number).

Statuses: ok (correct is true/false) | no_answer (nothing extracted: correct = false, the trace
gave no answer) | no_reference (the problem has no answer, or its source is in `skip_sources`:
correct = null, non-math rows pass through) | timeout | error (correct = null: unverifiable).
"""
from __future__ import annotations

import ctypes
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from stages.lib.latex import matching_braces

FALLBACKS = ("answer_is", "last_number", "math_verify")
# What verify and evaluate try after \boxed{}, unless the recipe says otherwise.
DEFAULT_FALLBACKS = ("answer_is", "math_verify")


@dataclass
class VerifyConfig:
    """Knobs of the verify stage.

    answer_field: the column the answer is extracted from: "final" (the text after </think>; a
      trace cut off inside its reasoning has none, so it gets no_answer) or "completion".
    fallbacks: extractors tried in order when the text has no \\boxed{...}: "answer_is" (the last
      "the answer is X"), "math_verify" (math-verify's own extraction, `parse` with its default
      LaTeX + expression configs, over the answer part: the `final` column, the text after the
      reasoning; a short bare line such as `[0,1)` or `\\dfrac{3}{4}`, which it skips outside
      `$…$`, is read as math; not for a trace cut off at max_tokens, which wrote no final line),
      "last_number" (the last number in the text; lenient, opt-in).
    timeout_s: hard wall-clock bound on one parse+verify call (the child is killed past it).
    memory_mib: address-space cap of the checking child process (huge powers fail, not swap).
    easy_min_pass_rate / medium_min_pass_rate: difficulty from the problem's pass rate:
      easy >= 0.8 > medium >= 0.3 > hard (defaults). pass_rate = correct / verifiable samples
      (timeouts, errors and no_reference rows are not counted); null when none is verifiable.
    skip_sources: rows whose `source` is listed are not checked (non-math data: code, chat);
      they get status no_reference and correct = null, and pass through.
    batch_size: rows per Ray map task batch.
    correct_from: what `correct` is. "verify" (default): math-verify against the reference.
      For imported traces that carry the source's own verdicts (generate's
      source_correct_math_verify / source_correct_llama columns, docs/import.md):
      "source_math_verify", "source_llama", or "source_both" (REDI's rule for OpenR1-Math: correct
      only when both say so; a trace either calls wrong, or one leaves unjudged, is incorrect;
      one neither judged is null). math-verify still runs: its verdict is kept as
      `checked_correct` and the stats report how often it agrees with each source verdict.
    """

    answer_field: str = "final"
    fallbacks: list = field(default_factory=lambda: list(DEFAULT_FALLBACKS))
    timeout_s: float = 5.0
    memory_mib: int = 2048
    easy_min_pass_rate: float = 0.8
    medium_min_pass_rate: float = 0.3
    skip_sources: list = field(default_factory=list)
    batch_size: int = 256
    correct_from: str = "verify"


# --------------------------------------------------------------------------- answer extraction
# Linear in the text: one regex pass finds every \boxed/\fbox, one pass over the braces matches
# them all (a stack), and "the answer is" reads each line once. The older scan matched braces
# again from every unclosed \boxed to the end of the text: "\boxed{(" * 20000 (160k chars, a
# teacher looping until max_tokens) cost 20000 scans * 80k chars = 1.6e9 steps, 89 s. Extraction
# also runs inside the Checker's child, under the same per-row timeout as math-verify (bounded,
# not only fast). Same answers as before on 600k random strings of these pieces.

_BOX = re.compile(r"\\(boxed|fbox)( *)")
_BARE = re.compile(r"[^\s$]+")  # "\boxed 5": up to the next space or '$'
_ANSWER_IS = re.compile(r"answer is", re.IGNORECASE)
_SKIP = re.compile(r"[:\s]*")
_SPACE = re.compile(r"\s*")
_TAIL = re.compile(r"\s*\.?\s*")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces matched; None if absent. An
    unclosed last one falls back to the one before it (a truncated last line)."""
    boxes = list(_BOX.finditer(text))
    if not boxes:
        return None
    closes = matching_braces(text)
    for m in reversed(boxes):
        i = m.end()
        if i < len(text) and text[i] == "{":
            if i in closes:
                return text[i + 1:closes[i]].strip()
        elif i < len(text) and (m.group(1) == "boxed" or m.group(2)):  # "\fbox5" is no box
            bare = _BARE.match(text, i)
            if bare:
                return bare.group().rstrip(".")
    return None


def _answer_is(text: str) -> str | None:
    """The last non-empty X of "the answer is[:] [$]X[$][.]" at the end of a line."""
    found, pos = None, 0
    # The current line's end, the next '$' and whether what follows that '$' may close the line,
    # cached: k only grows, so each is searched for once per line / per '$' (linear, not
    # "every hit rescans its line").
    end = dollar = tail_of = -1
    tail_ok = False
    for m in _ANSWER_IS.finditer(text):
        if m.start() < pos:  # inside the line of the previous hit
            continue
        k = _SKIP.match(text, m.end()).end()
        if text.startswith("$", k):
            k = _SPACE.match(text, k + 1).end()
        if end < k:
            end = text.find("\n", k)
            end = len(text) if end == -1 else end
        if dollar < k:
            dollar = text.find("$", k)
            dollar = len(text) if dollar == -1 else dollar
        if dollar < end:  # "$X$." closes the math: only spaces and one '.' may follow
            if tail_of != dollar:
                tail_of, tail_ok = dollar, _TAIL.match(text, dollar + 1, end).end() == end
            if not tail_ok:
                continue
            answer = text[k:dollar].strip()
        else:
            answer = text[k:end].rstrip()
            answer = (answer[:-1] if answer.endswith(".") else answer).strip()
        if answer:
            found, pos = answer, end
    return found


# One short line that is nothing but math (`[0,1)`, `\dfrac{3}{4}`, `2^{10}`, `3\sqrt{2}`, `x+1`):
# math-verify reads LaTeX only inside $…$, \(…\), \[…\] or a box, and bare text only as plain
# numbers and expressions, so on its own it finds nothing there or a piece (`2^{10}` -> 2,
# `(-\infty, 2]` -> 2). Such a line is parsed as $line$ first. No word of two letters or more
# outside LaTeX commands, so a sentence ("I give up") is never read as a product of variables.
_BARE_MATH_MAX = 80
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORD = re.compile(r"[A-Za-z]{2}")
_DELIMITED = re.compile(r"\$|\\[()\[\]]|\n")


def _bare_math(part: str) -> bool:
    return (len(part) <= _BARE_MATH_MAX and not _DELIMITED.search(part)
            and not _WORD.search(_LATEX_COMMAND.sub(" ", part)))


def _math_verify_parse(part: str) -> list:
    """math-verify's own extraction over an answer part ([] = nothing found): `parse` with its
    default configs (LaTeX + expressions), a bare line of math read as $line$ first. Unbounded
    in time: called inside the Checker's child (or a test)."""
    from math_verify import parse

    part = part.strip()
    if not part:
        return []
    if _bare_math(part):
        return parse("$" + part + "$", parsing_timeout=None) or parse(part, parsing_timeout=None)
    return parse(part, parsing_timeout=None)


def _extract(text: str, fallbacks, part: str | None = None) -> tuple[str | None, list | None]:
    """(answer, parsed): the last \\boxed{} of `text`, else each fallback in order. `parsed` is
    math-verify's parse when the "math_verify" extractor found the answer (it is verified as
    parsed, exactly as stock math-verify would), else None (the answer string is parsed as
    \\boxed{answer}). `part`: the answer part the math_verify extractor reads (default: text)."""
    found = last_boxed(text) if text else None
    if found:
        return found, None
    for name in fallbacks:
        parsed = None
        if name == "answer_is":
            hit = _answer_is(text) if text else None
        elif name == "last_number":
            hits = [m.group(0) for m in _NUMBER.finditer(text or "")]
            hit = hits[-1].replace(",", "") if hits else None
        else:  # math_verify: parse -> [sympy object, the string it matched] (or [string])
            parsed = _math_verify_parse(text if part is None else part)
            hit = (parsed[-1] if isinstance(parsed[-1], str) else str(parsed[0])) if parsed else None
        if hit:
            return hit, parsed
    return None, None


def extract_answer(text: str, fallbacks=DEFAULT_FALLBACKS) -> str | None:
    """The final answer of a trace: the last \\boxed{} first, then each fallback in order (what
    verify's child extracts; "math_verify" imports math-verify here and is not time-bounded)."""
    return _extract(text, fallbacks)[0]


# --------------------------------------------------------------------------- bounded checking

def _serve(conn, memory_mib: int) -> None:
    """The checking child, until EOF. A message in is (fallbacks, [(text, ref, part), ...]); per
    row out: ("pred", answer) — extracted with `fallbacks` (the math_verify extractor reading
    `part`, or the text when part is None), or the text itself when fallbacks is None — then,
    when both answer and ref are present, ("ok", bool) | ("error", message)."""

    # math-verify warns on every call that its own (signal) timeout is off: ours is the kill.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    cap = memory_mib << 20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    from math_verify import parse, verify

    golds: dict = {}
    verdicts: dict = {}  # (pred, ref) -> bool: n samples of a problem mostly agree
    conn.send(("pid", os.getpid()))
    while True:
        try:
            fallbacks, rows = conn.recv()
        except EOFError:
            os._exit(0)
        for text, ref, part in rows:
            try:
                pred, parsed = ((text, None) if fallbacks is None
                                else _extract(text or "", fallbacks, part))
            except (Exception, MemoryError, RecursionError) as e:  # e.g. out of memory_mib
                conn.send(("error", f"extract: {type(e).__name__}: {e}"[:200]))
                continue
            conn.send(("pred", pred))
            if pred is None or ref is None:
                continue
            try:
                # The same string may be a box's content or what math-verify matched in the text
                # (its parse can differ, e.g. "50%"): separate verdicts.
                key = (pred, ref, parsed is not None)
                if key not in verdicts:
                    gold = golds.get(ref)
                    if gold is None:
                        # Wrapping in \boxed{} makes math-verify read the bare string as LaTeX
                        # ("0.5", "\frac{1}{2}", "x+1" alike). A reference it cannot parse at
                        # all is compared as a string.
                        gold = golds[ref] = parse("\\boxed{" + ref + "}", parsing_timeout=None) or [ref]
                    target = parsed or parse("\\boxed{" + pred + "}", parsing_timeout=None) or [pred]
                    verdicts[key] = bool(verify(gold, target, timeout_seconds=None))
                conn.send(("ok", verdicts[key]))
            except (Exception, MemoryError, RecursionError) as e:
                conn.send(("error", f"{type(e).__name__}: {e}"[:200]))


def _die_with_parent() -> None:
    """SIGKILL this process when its parent dies, even while it is stuck in C code."""
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1


def _helper_main(fd: int, memory_mib: int) -> None:
    """`python stages/verify.py FD MIB`: import math-verify once, then fork checking children.

    A child killed for a timeout is replaced by a fresh fork (a few ms, no re-import); a child
    that exits 0 saw EOF (the Checker closed), and then the helper exits too.
    """
    _die_with_parent()
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    from math_verify import parse, verify

    # Imported and warmed up once here (the LaTeX grammar and sympy's caches build on first use,
    # ~0.1-0.5 s), so every fork starts ready.
    verify(parse("\\boxed{\\frac{1}{2}}", parsing_timeout=None),
           parse("\\boxed{0.5}", parsing_timeout=None), timeout_seconds=None)
    _math_verify_parse("so the total is $x = 0.5$, i.e. 1/2")  # the text extractors' regexes

    conn = Connection(fd)
    while True:
        pid = os.fork()
        if pid == 0:
            _die_with_parent()
            _serve(conn, memory_mib)
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            return


class Checker:
    """math-verify in a child process with a hard per-call timeout (kill + fresh child).

    Not multiprocessing: its spawn/forkserver re-run the parent's __main__ (a Ray worker's), and
    a plain fork of a threaded Ray worker is unsafe. A helper started with subprocess imports
    math-verify once and forks each checking child from that clean, single-threaded state.
    """

    START_TIMEOUT_S = 120  # helper start = a Python start + importing math-verify/sympy (~0.5 s)

    def __init__(self, timeout_s: float, memory_mib: int):
        self.timeout_s, self.memory_mib = timeout_s, memory_mib
        self.helper = self.conn = self.pid = None
        self.restarts = 0

    def _start(self) -> None:
        if self.conn is not None:  # the previous helper died
            self.conn.close()
        ours, theirs = socket.socketpair()
        self.helper = subprocess.Popen(
            # A script, not `-m stages.lib.answers` (that imports every stage first); -P keeps
            # stages/ off sys.path, where select.py would shadow the standard library's `select`.
            [sys.executable, "-P", os.path.abspath(__file__), str(theirs.fileno()),
             str(self.memory_mib)],
            pass_fds=[theirs.fileno()],
            # Our sys.path, so `stages` imports wherever Ray put this worker's code.
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
        theirs.close()
        self.conn = Connection(ours.detach())
        self._await_child()

    def _await_child(self) -> None:
        """Read up to the next child's hello; answers of a killed child are discarded."""
        while True:
            if not self.conn.poll(self.START_TIMEOUT_S):
                raise RuntimeError("verify: the math-verify helper did not start")
            try:
                kind, value = self.conn.recv()
            except EOFError:
                raise RuntimeError("verify: the math-verify helper exited (its stderr is "
                                   "above)") from None
            if kind == "pid":
                self.pid = value
                return

    def check(self, pred: str, ref: str) -> tuple[bool | None, str]:
        """(correct, status): (True|False, "ok") or (None, "timeout"|"error")."""
        return self.check_many([(pred, ref)])[0]

    def check_many(self, pairs: list[tuple[str, str]]) -> list[tuple[bool | None, str]]:
        """check() for each (answer, reference) pair: no extraction, the answers are given."""
        rows = [(pred, ref, None) for pred, ref in pairs]
        return [(correct, status) for _, correct, status in self._run(None, rows)]

    def check_texts(self, texts: list, refs: list, fallbacks, parts: list | None = None) -> list[tuple]:
        """(pred_answer, correct, status) per trace text: extract_answer(text, fallbacks), then
        math-verify against ref — both in the child, inside one timeout_s per row. `parts`: the
        answer part of each text, which the math_verify extractor reads (None: the text itself).
        Status: ok | no_answer (nothing extracted) | no_reference (ref is None: extracted, not
        checked) | timeout | error."""
        parts = [None] * len(texts) if parts is None else list(parts)
        return self._run(list(fallbacks), list(zip(texts, refs, parts)))

    def _run(self, fallbacks, rows: list[tuple]) -> list[tuple]:
        """Rows sent to the child as one message (two process wake-ups per batch, not per row).
        Each row's messages must all arrive within timeout_s of that row's start; past it the
        child is killed and the rest are resent to the next one."""
        results: list = []
        while len(results) < len(rows):
            if self.helper is None or self.helper.poll() is not None:  # none yet, or it died
                self._start()
            todo = rows[len(results):]
            self.conn.send((fallbacks, todo))
            for _, ref, _ in todo:
                pred, verdict, restarted = self._one_row(ref)
                results.append((pred, *verdict))
                if restarted:  # the child was replaced: resend the rows not answered yet
                    break
        return results

    def _one_row(self, ref) -> tuple:
        """(pred, (correct, status), child restarted?) for the next row the child answers."""
        deadline = time.monotonic() + self.timeout_s
        pred = None
        while True:
            if not self.conn.poll(max(0.0, deadline - time.monotonic())):
                os.kill(self.pid, signal.SIGKILL)
                self.restarts += 1
                self._await_child()
                return pred, (None, "timeout"), True
            kind, value = self.conn.recv()
            if kind == "pid":  # the child died mid-row (e.g. killed by the kernel)
                self.pid = value
                self.restarts += 1
                return pred, (None, "error"), True
            if kind == "error":
                return pred, (None, "error"), False
            if kind == "ok":
                return pred, (value, "ok"), False
            pred = value  # "pred": a verdict follows only when there is something to check
            if pred is None:
                return None, ((None, "no_reference") if ref is None else (False, "no_answer")), False
            if ref is None:
                return pred, (None, "no_reference"), False

    def close(self) -> None:
        if self.helper is not None:
            self.conn.close()  # child sees EOF and exits 0, then the helper exits
            try:
                self.helper.wait(timeout=5)
            except Exception:
                self.helper.kill()
                self.helper.wait()
            self.helper = self.conn = self.pid = None


_CHECKERS: dict = {}


def _checker(timeout_s: float, memory_mib: int) -> Checker:
    """One Checker per process (per Ray worker), reused by every batch that worker runs."""
    key = (timeout_s, memory_mib)
    if key not in _CHECKERS:
        _CHECKERS[key] = Checker(timeout_s, memory_mib)
    return _CHECKERS[key]


def verify_rows(texts, refs, cfg: VerifyConfig, checker: Checker | None = None,
                sources=None, parts=None) -> dict:
    """Columns pred_answer / correct / verify_status for parallel lists of texts and references
    (and sources, checked against cfg.skip_sources). Extraction and checking both run in the
    Checker's child, so each row, however degenerate its text, is answered within timeout_s.
    `parts`: each text's answer part (after the reasoning) for the math_verify extractor, when
    the texts are whole completions; None = the texts are answer parts already.
    """
    checker = checker or _checker(cfg.timeout_s, cfg.memory_mib)
    checked_refs = []
    for i, ref in enumerate(refs):
        skip = ref is None or not str(ref).strip() or (sources and sources[i] in cfg.skip_sources)
        checked_refs.append(None if skip else str(ref).strip())
    got = checker.check_texts(list(texts), checked_refs, cfg.fallbacks, parts)
    return {"pred_answer": [g[0] for g in got], "correct": [g[1] for g in got],
            "verify_status": [g[2] for g in got]}


def answer_parts(finals: list | None, finish_reasons: list | None) -> list | None:
    """Per row, what the math_verify extractor reads (verify_rows' `parts`): the answer part
    (`finals`; None = the text checked is the answer part already), or "" for a trace cut off at
    max_tokens (finish_reason "length"). A cut trace never wrote its final line, and math-verify
    would take the last number it did write (a step of the reasoning, or a cut "…= 2" for 72);
    its \\boxed{} or "the answer is", written before the cut, still count."""
    if finish_reasons is None:
        return finals
    base = finals if finals is not None else [None] * len(finish_reasons)
    return ["" if reason == "length" else part for part, reason in zip(base, finish_reasons)]


def difficulty_of(pass_rate: float | None, cfg: VerifyConfig) -> str | None:
    if pass_rate is None:
        return None
    if pass_rate >= cfg.easy_min_pass_rate:
        return "easy"
    return "medium" if pass_rate >= cfg.medium_min_pass_rate else "hard"


if __name__ == "__main__":  # the Checker's helper process
    _helper_main(int(sys.argv[1]), int(sys.argv[2]))
