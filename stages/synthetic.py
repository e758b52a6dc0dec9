"""Synthetic verifiable problems: multi-step integer arithmetic with worked solutions.

Used by tests and the built-in demo (no network: the data is made here). Each problem has an
integer answer, a worked step-by-step `solution` (what the demo teacher is trained to write) and a
`difficulty` = number of operations.

    Compute 45 + 38 - 27.
    <think>
    45 + 38 = 83
    83 - 27 = 56
    </think>
    The answer is \\boxed{56}.

A subtraction is only drawn when it keeps the running value >= 0: every intermediate result is a
non-negative integer, which keeps the task learnable by a model trained for minutes on 2 cores.
"""
from __future__ import annotations

import random


def make_problems(n: int, seed: int = 0, min_terms: int = 2, max_terms: int = 4,
                  max_operand: int = 99, exclude: set | frozenset = frozenset()) -> list[dict]:
    """n distinct problems like "Compute 12 + 7 - 3." with answer "16".

    Difficulty grows with the number of terms (min_terms..max_terms) and operand size.
    `exclude`: problem texts never to return (a held-out set stays disjoint from a training set).
    """
    rng = random.Random(seed)
    seen, out = set(exclude), []
    while len(out) < n:
        k = rng.randint(min_terms, max_terms)
        terms = [rng.randint(0, max_operand) for _ in range(k)]
        value, steps, text = terms[0], [], str(terms[0])
        for t in terms[1:]:
            op = rng.choice("+-") if value >= t else "+"
            new = value + t if op == "+" else value - t
            steps.append(f"{value} {op} {t} = {new}")
            text += f" {op} {t}"
            value = new
        problem = f"Compute {text}."
        if problem in seen:
            continue
        seen.add(problem)
        out.append({
            "problem": problem,
            "answer": str(value),
            "solution": "<think>\n" + "\n".join(steps) + "\n</think>\n"
                        f"The answer is \\boxed{{{value}}}.",
            "difficulty": k - 1,
        })
    return out
