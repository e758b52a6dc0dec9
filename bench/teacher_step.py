r"""Benchmark: one training step of the demo teacher — a padded batch through stock transformers
(sdpa, labels -100 on prompt and padding) vs the packed row `pipeline/apps/demo.py train_lm` uses
(stages/lib/packed.py: no padding, causal attention within each sample, LM head on completion
positions only).

    .venv/bin/python bench/teacher_step.py                     # the demo's shape and batches
    .venv/bin/python bench/teacher_step.py --steps 80

Same model weights, same batches (32 examples drawn as the teacher's phases draw them: concise
traces only = phase 1, the style mix = phase 2), AdamW + clipping as train_lm does. First
checks that both give the same loss on the first batch (to 1e-5), then times `--steps` steps of
each after 5 warm-up steps. Prints seconds per step and the ratio stock / packed per phase.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from pipeline.apps.demo import SLIP_RATE, STYLE_MIX, TASK, TEACHER, _encode, trace_draw
    from pipeline.apps.tiny_model import build_tokenizer
    from stages.lib.packed import ATTENTION, collate, completion_logps, packed_row, register_attention
    from stages.lib.synthetic import make_problems

    register_attention()
    shape = TEACHER["shape"]
    tok = build_tokenizer(shape["vocab"])
    problems = make_problems(2000, seed=1, **TASK)

    def model(attn: str):
        torch.manual_seed(0)
        config = Qwen2Config(
            vocab_size=len(tok), hidden_size=shape["hidden"],
            intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
            num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
            max_position_embeddings=1024, tie_word_embeddings=True, torch_dtype="float32")
        m = Qwen2ForCausalLM(config)
        m.config._attn_implementation = attn
        return m

    def padded_loss(m, rows):
        width = max(len(ids) for ids, _ in rows)
        x = torch.full((len(rows), width), tok.pad_token_id)
        y = torch.full((len(rows), width), -100)
        for i, (ids, start) in enumerate(rows):
            x[i, :len(ids)] = torch.tensor(ids)
            y[i, start:len(ids)] = torch.tensor(ids[start:])
        return m(input_ids=x, labels=y).loss

    def packed_loss(m, rows):
        return -completion_logps(m, collate([packed_row(rows)])).mean()

    ok = True
    for phase, styles in (("phase 1 (concise)", {"concise": 1.0}), ("phase 2 (style mix)", STYLE_MIX)):
        draw, rng = trace_draw(problems, styles, SLIP_RATE), random.Random(0)
        batches = [[_encode(tok, *(lambda e: (e["problem"], e["solution"]))(draw(rng)))
                    for _ in range(TEACHER["batch"])] for _ in range(args.steps + 5)]
        stock, ours = model("sdpa"), model(ATTENTION)
        ours.load_state_dict(stock.state_dict())
        with torch.no_grad():
            a, b = padded_loss(stock, batches[0]).item(), packed_loss(ours, batches[0]).item()
        ok &= abs(a - b) < 1e-5
        timing = {}
        for name, m, loss_fn in (("stock", stock, padded_loss), ("packed", ours, packed_loss)):
            opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
            for i, rows in enumerate(batches):
                if i == 5:
                    started = time.time()
                loss_fn(m, rows).backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            timing[name] = (time.time() - started) / args.steps
        real = sum(len(ids) for rows in batches for ids, _ in rows) / len(batches)
        width = sum(max(len(ids) for ids, _ in rows) for rows in batches) / len(batches)
        print(f"{phase}: loss stock {a:.6f} packed {b:.6f}; {real:.0f} real tokens a batch, "
              f"padded {width * TEACHER['batch']:.0f}")
        print(f"  stock (padded, transformers sdpa): {timing['stock']:.4f} s/step")
        print(f"  packed (stages/lib/packed.py):         {timing['packed']:.4f} s/step")
        print(f"  ratio stock / packed: {timing['stock'] / timing['packed']:.2f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
