"""stages/lib/ingest.py TokenCounter: the Rust-side count (encode_batch_fast, no offsets) gives
the lengths of the tokenizer's own input_ids, on long and short texts, across chunk borders, and
the slow-tokenizer path gives the same."""
from __future__ import annotations

import random

from pipeline.apps.tiny_model import build_tiny_model
from stages.lib.ingest import TokenCounter


def test_counts_equal_input_ids_lengths(tmp_path):
    model = build_tiny_model(str(tmp_path / "tiny"))
    counter = TokenCounter("deepseek-r1", model)  # a label: the student's tokenizer counts
    assert counter.name == model and "deepseek-r1" in counter.note
    rng = random.Random(0)
    words = ["so", "12", "+", "=", "wait", "\\frac{1}{2}", "é", "日本", "\n", "<think>", " "]
    texts = ["", "x"] + ["".join(rng.choice(words) for _ in range(rng.randint(1, 300)))
                         for _ in range(TokenCounter.CHUNK + 5)]  # two encode calls
    want = [len(ids) for ids in
            counter.tokenizer(texts, add_special_tokens=False)["input_ids"]]
    assert counter.count(texts) == want
    assert counter.count([]) == []

    class Slow:  # a tokenizer without a Rust backend: the Python path
        def __init__(self, tok):
            self.tok = tok

        def __call__(self, *args, **kwargs):
            return self.tok(*args, **kwargs)

    counter.tokenizer = Slow(counter.tokenizer)
    assert counter.count(texts) == want
