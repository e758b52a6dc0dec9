"""Synthetic verifiable problems: multi-step integer arithmetic with worked solutions.

Used by tests and the built-in demo (no network: the data is made here). Each problem has an
integer answer, a worked step-by-step `solution` (what a teacher is trained to write) and a
`difficulty` = number of operations.
"""
from __future__ import annotations

import random


def make_problems(n: int, seed: int = 0, min_terms: int = 2, max_terms: int = 4,
                  max_operand: int = 99) -> list[dict]:
    """n distinct problems like "Compute 12 + 7 - 3." with answer "16".

    Difficulty grows with the number of terms (min_terms..max_terms) and operand size.
    """
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        k = rng.randint(min_terms, max_terms)
        terms = [rng.randint(0, max_operand) for _ in range(k)]
        ops = [rng.choice("+-") for _ in range(k - 1)]
        text = " ".join([str(terms[0])] + [f"{o} {t}" for o, t in zip(ops, terms[1:])])
        if text in seen:
            continue
        seen.add(text)
        value, steps = terms[0], []
        for op, t in zip(ops, terms[1:]):
            new = value + t if op == "+" else value - t
            steps.append(f"{value} {op} {t} = {new}")
            value = new
        out.append({
            "problem": f"Compute {text}.",
            "answer": str(value),
            "solution": "<think>\n" + "\n".join(steps) + "\n</think>\n"
                        f"The answer is \\boxed{{{value}}}.",
            "difficulty": k - 1,
        })
    return out
