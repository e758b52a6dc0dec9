"""Live progress of a long stage: a tqdm bar on a terminal, plain periodic lines otherwise.

    progress = Progress("generate", total=2048, unit="rows")
    progress.update(512, tokens=40_000, errors=0)   # after each shard / batch / step
    progress.close()

On a terminal (stderr is a TTY): items done/total, rate, ETA, and in the postfix output tokens/s
and errors so far. Not a terminal (a Ray job's logs, a file, CI): one line every `every_s`
seconds (DISTILLERY_PROGRESS_EVERY_S, default 30) and at the end, e.g.

    generate: 512/2048 rows (25.0%), 41.2 rows/s, 3210 output tok/s, 0 errors, ETA 00:37
"""
from __future__ import annotations

import os
import sys
import time


class Progress:
    """Counts items (and output tokens, and errors) towards a known total.

    done: items finished by an earlier, interrupted run (resumed shards / steps).
    errors: whether the stage counts errors as it goes (shown as "N errors").
    tokens_label: what the tokens are ("output tok/s" for generation, "train tok/s").
    every_s: seconds between plain lines (default $DISTILLERY_PROGRESS_EVERY_S or 30)."""

    def __init__(self, name: str, total: int, unit: str = "rows", done: int = 0,
                 errors: bool = True, tokens_label: str = "output tok/s",
                 every_s: float | None = None):
        from tqdm import tqdm

        self.name, self.total, self.unit = name, total, unit
        self.count_errors = errors  # False: the stage cannot count them as it goes (verify)
        self.tokens_label = tokens_label
        self.done = self.tokens = self.errors = 0
        self.already = done  # finished before this run (resumed shards): not in the rates
        self.started = self.last_line = time.time()
        self.every_s = (every_s if every_s is not None
                        else float(os.environ.get("DISTILLERY_PROGRESS_EVERY_S", "30")))
        self.bar = (tqdm(total=total, initial=done, desc=name, unit=f" {unit}", dynamic_ncols=True,
                         file=sys.stderr) if sys.stderr.isatty() else None)

    def update(self, n: int, tokens: int = 0, errors: int = 0) -> None:
        self.done += n
        self.tokens += tokens
        self.errors += errors
        if self.bar is not None:
            elapsed = max(time.time() - self.started, 1e-9)
            postfix = [f"{self.tokens / elapsed:.0f} {self.tokens_label}"] if self.tokens else []
            postfix += [f"{self.errors} errors"] if self.count_errors else []
            self.bar.set_postfix_str(", ".join(postfix), refresh=False)
            self.bar.update(n)
        elif time.time() - self.last_line >= self.every_s:
            self.print_line()

    def line(self) -> str:
        """The plain progress line (also what the bar shows, in words)."""
        from tqdm import tqdm

        elapsed = max(time.time() - self.started, 1e-9)
        have = self.already + self.done
        rate = self.done / elapsed
        # ETA from this run's rate: resumed items cost nothing and would make it optimistic.
        eta = tqdm.format_interval((self.total - have) / rate) if rate > 0 else "?"
        pct = 100.0 * have / self.total if self.total else 100.0
        text = f"{self.name}: {have}/{self.total} {self.unit} ({pct:.1f}%), {rate:.1f} {self.unit}/s"
        if self.tokens:
            text += f", {self.tokens / elapsed:.0f} {self.tokens_label}"
        if self.count_errors:
            text += f", {self.errors} errors"
        return text + f", ETA {eta}"

    def print_line(self) -> None:
        self.last_line = time.time()
        print(self.line(), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            self.print_line()
