"""Sequence parallelism (DeepSpeed Ulysses / ALST) for packed rows: N workers share one row.

Why: a packed row longer than one worker holds (activations grow with its tokens; the LM head's
logits no longer do, stages/lib/lm_head.py) is split along the sequence over N workers, each
holding T / N positions through every layer. Only attention needs the whole row: DeepSpeed's
UlyssesSPAttentionHF (deepspeed >= 0.18, pinned 0.19.8) wraps our attention function and, in
each layer, exchanges q, k, v all-to-all so that every worker attends over all T positions for
heads / N of the heads, then exchanges the output back to its T / N positions. Per layer that is
4 all-to-alls of T x hidden / N elements each per worker.

    enable(model, size)            wrap the model's attention (stages/lib/packed.py ATTENTION)
    shard_row(batch, rank, size)   the worker's T / N positions of a collated packed row

The row is padded to a multiple of N with a separate pad "sample" at its end (its own entry in
cu_seqlens: attended only by itself, never a target). A worker's completion positions (`keep`)
are the ones inside its slice, so summed over the group's workers each target is scored once:
sft's loss, -sum(logps) x world / (global completion tokens), needs no change, and DeepSpeed's
gradient average over all workers (each of the group's workers' backward sends the other
workers' share of its attention gradient back through the all-to-all) gives the same gradient
as the whole row on one worker. Checked on 2 gloo CPU workers against one worker
(tests/test_sequence_parallel.py); gloo has all_to_all_single on CPU.

Limits: heads and kv_heads must divide by N (or N by kv_heads: the kv heads are replicated),
as UlyssesSPAttentionHF requires. REDI's per-pair means need each pair's token count over the
whole row, not the worker's slice; only sft takes `resources.sft.sequence_parallel`.
"""
from __future__ import annotations

import random

from stages.lib.packed import ATTENTION, register_attention


def grouped_rows(rows: list, size: int, seed: int) -> list:
    """The training rows for `size`-way groups: a seeded shuffle, each row `size` times in a
    row. With a sequential sampler, accelerate hands item k to worker k mod world, so the
    `size` consecutive workers of a group (DeepSpeed's groups) get the same row each step."""
    order = random.Random(seed).sample(range(len(rows)), len(rows))
    return [rows[i] for i in order for _ in range(size)]


def check(model_config, size: int) -> str | None:
    """Why `size`-way sequence parallelism cannot run on this model (None when it can)."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") \
        else model_config
    heads, kv = text.num_attention_heads, text.num_key_value_heads
    if heads % size:
        return f"{heads} attention heads do not divide by sequence_parallel={size}"
    if kv % size and size % kv:
        return f"{kv} key/value heads and sequence_parallel={size}: neither divides the other"
    return None


def enable(model, size: int):
    """Wrap the attention of every model in this process for `size`-way Ulysses over
    consecutive ranks (DeepSpeed's sequence-parallel groups); returns DeepSpeed's mpu.
    torch.distributed must be initialised and its world size divisible by `size`."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    # the groups are made with deepspeed.comm (a no-op when ZeRO-3 initialised it already)
    deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized()
                               else "gloo")
    register_attention()
    return UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation=ATTENTION,
        sequence_parallel_size=size, micro_batch_size=1, seq_length_is_variable=True)


def shard_row(batch: dict, rank: int, size: int) -> dict:
    """Worker `rank`'s slice of a collated packed row (stages/lib/packed.py collate): input_ids
    and position_ids [1, T / N]; cu_seqlens and max_seqlen stay the whole row's (attention runs
    over all of it after the all-to-all); keep / targets / keep_seq: the completion positions
    inside the slice, keep counted from the slice's start."""
    import torch

    ids, pos, cu = batch["input_ids"], batch["position_ids"], batch["cu_seqlens"]
    total = ids.shape[1]
    pad = -total % size
    longest = batch["max_seqlen"]
    if pad:
        ids = torch.cat([ids, ids.new_zeros(1, pad)], dim=1)
        pos = torch.cat([pos, torch.arange(pad, dtype=pos.dtype)[None]], dim=1)
        cu = torch.cat([cu, cu.new_tensor([total + pad])])
        longest = max(longest, pad)
    width = (total + pad) // size
    a, b = rank * width, (rank + 1) * width
    inside = (batch["keep"] >= a) & (batch["keep"] < b)
    return {"input_ids": ids[:, a:b], "position_ids": pos[:, a:b], "cu_seqlens": cu,
            "max_seqlen": longest, "keep": batch["keep"][inside] - a,
            "targets": batch["targets"][inside], "keep_seq": batch["keep_seq"][inside],
            "n_seqs": batch["n_seqs"]}
