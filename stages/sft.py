"""Stage `sft` — supervised fine-tuning of the student on the selected traces (REDI stage 1).

Reads `select` (split `sft`: chat `messages` whose last turn is the assistant's
"<think>…</think> answer"), trains the student with completion-only loss under DeepSpeed ZeRO on
Ray Train workers (cluster/train.py), and writes a Hugging Face checkpoint folder (model +
tokenizer + chat template) as its version.

    distillery run sft --recipe configs/tiny.yaml student=/tmp/tiny sft.epochs=2

The training step is ours, not TRL's: the packed, padding-free forward of stages/lib/packed.py
(shared with redi and provenance). bench/train.py measures it against TRL's SFTTrainer;
docs/training.md is the guide.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from cluster.train import fit
from pipeline.errors import UserError
from pipeline.stage import Stage
from stages.lib.chat import check_chat_format, target_format
from stages.lib.packed import completion_logps, encode, fit_length, pack, packed_row
from stages.lib.sequence_parallel import check
from stages.lib.trainer import global_sum, read_stats, train_packed, upstream_drops, worker_config


@dataclass
class SFTConfig:
    """Knobs of the SFT stage (defaults: docs/methods.md, REDI stage 1).

    student: the model to train (hub id or local path); the recipe's top-level `student` fills it.
    epochs: passes over the SFT set (METHODS: 3 for ablations, 5 final).
    max_steps: stop after this many optimizer steps (0 = `epochs` decides).
    learning_rate: peak LR (5e-5), reached after `warmup_ratio` of the steps (10%), then
      `lr_scheduler` ("linear" to 0, or any transformers scheduler name).
    weight_decay: AdamW weight decay (1e-4).
    max_grad_norm: gradient clipping (0 = none).
    max_length: longest sample in tokens, prompt + completion.
    overlong: what happens to a longer sample: "truncate" (cut the completion's tail; counted in
      stats.truncated) or "drop" (counted in drops.over_max_length). A prompt that alone fills
      max_length is always dropped (drops.prompt_over_max_length).
    tokens_per_step: tokens in one optimizer step, all workers together; each worker packs
      tokens_per_step / num_workers tokens (must be >= max_length) into one padding-free row.
      Real traces, 16,384 tokens/step on 8 workers -> 2,048-token rows of ~2 samples each.
    seed: shuffling of the packed rows and init of anything random.
    save_steps: write a resumable checkpoint every N steps (0 = only the final model); an
      interrupted run restarts from the newest one when run again with the same config.
    logging_steps: log loss / LR every N steps (TensorBoard under <version>/logs, manifest lists).
    report_to: "tensorboard", "none", or any transformers `report_to` value (wandb, mlflow …).
    chat_template / prompt_format: how a conversation becomes the training text: "" / "chat" =
      the student's own chat template; "raw" = prompt text + answer text + EOS (a base model
      without a template). Use the same values in evaluate. The target is the trace as the
      student writes it after its prompt, ending with its stop token (docs/training.md).
    reasoning_tags: how traces mark their reasoning ("think": <think>…</think>; "thought":
      Sky-T1 / Bespoke-Stratos' <|begin_of_thought|>…); the recipe's top-level
      `reasoning_tags` fills it (stages/lib/chat.py, REASONING_TAGS).
    """

    student: str = ""
    epochs: float = 3.0
    max_steps: int = 0
    learning_rate: float = 5e-5
    warmup_ratio: float = 0.1
    lr_scheduler: str = "linear"
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    max_length: int = 4096
    overlong: str = "truncate"
    tokens_per_step: int = 16384
    seed: int = 0
    chat_template: str = ""
    prompt_format: str = "chat"
    reasoning_tags: str = "think"
    save_steps: int = 50
    logging_steps: int = 1
    report_to: str = "tensorboard"


def sft_loss(model, batch):
    """Mean negative log-likelihood over the completion tokens of the whole global step.

    Each worker divides its token sum by the global completion-token count x world size; the
    gradient average over workers then gives exactly the global token mean, however unevenly
    the packed rows split prompt and completion tokens.
    """
    import torch
    import torch.distributed as dist

    # the loss is -sum(logps) x a constant: every token's weight is -1 (lm_head's fused path)
    logps = completion_logps(model, batch,
                             weights=torch.full(batch["targets"].shape, -1.0,
                                                device=batch["targets"].device))
    world = dist.get_world_size() if dist.is_initialized() else 1
    n_global = global_sum(logps.numel())
    return -logps.sum() * (world / n_global), {}


def sft_worker(config: dict) -> None:
    train_packed(config, sft_loss)


# --- the stage -----------------------------------------------------------------------------------

def run(cfg: SFTConfig, inputs, ctx):
    from transformers import AutoTokenizer

    if cfg.overlong not in ("truncate", "drop"):
        raise UserError(f"sft.overlong: '{cfg.overlong}' (use 'truncate' or 'drop')")
    workers, sp = ctx.resources.num_workers, ctx.resources.sequence_parallel
    if not isinstance(sp, int) or isinstance(sp, bool) or sp < 1 or workers % sp:
        raise UserError(f"resources.sft.sequence_parallel: {sp!r} (a whole number >= 1 that "
                        f"divides resources.sft.num_workers={workers})")
    if sp > 1:
        from transformers import AutoConfig

        reason = check(AutoConfig.from_pretrained(cfg.student), sp)
        if reason:
            raise UserError(f"resources.sft.sequence_parallel: {cfg.student}: {reason}")
    rows_per_step = workers // sp  # a row per worker, or per group of sp workers sharing it
    capacity = cfg.tokens_per_step // rows_per_step  # 16,384 tokens / 8 rows = 2,048 per row
    if capacity < cfg.max_length:
        raise UserError(f"sft.tokens_per_step={cfg.tokens_per_step} over {rows_per_step} rows a "
                        f"step gives {capacity}-token rows, shorter than sft.max_length="
                        f"{cfg.max_length}: raise tokens_per_step to at least "
                        f"{cfg.max_length * rows_per_step}")
    student = cfg.student
    template = check_chat_format(student, cfg.chat_template, cfg.prompt_format, "sft", "student")
    tokenizer = AutoTokenizer.from_pretrained(student)
    fmt = target_format(tokenizer, student, template, cfg.prompt_format, cfg.reasoning_tags,
                        "sft.student")
    source = inputs["select"]
    messages = source.read_table("sft", columns=["messages"]).column("messages").to_pylist()
    if not messages:
        raise UserError(f"sft: {source.ref()} has no SFT rows (split 'sft' is empty): "
                        f"{upstream_drops(source, ctx.data_root)}")

    samples, stats = [], {"truncated": 0}
    for i, conversation in enumerate(messages):
        if not conversation or conversation[-1]["role"] != "assistant":
            raise UserError(f"sft: {source.ref()} split 'sft' row {i}: the last message must be "
                            "the assistant's answer")
        ids, n_prompt, outcome = fit_length(
            *encode(tokenizer, conversation[:-1], conversation[-1]["content"], fmt),
            cfg.max_length, cfg.overlong)
        if ids is None:
            ctx.drops[outcome] += 1
            continue
        stats["truncated"] += outcome == "truncated"
        samples.append((ids, n_prompt))
    if not samples:
        raise UserError(f"sft: every one of the {len(messages)} SFT rows was dropped "
                        f"({dict(ctx.drops)}); raise sft.max_length or use sft.overlong=truncate")

    bins = pack([len(ids) for ids, _ in samples], capacity)
    random.Random(cfg.seed).shuffle(bins)  # longest-first packing order is not a training order
    rows = [packed_row([samples[i] for i in b]) for b in bins]
    n_tokens = sum(len(ids) for ids, _ in samples)
    stats.update(samples=len(samples), packed_rows=len(rows),
                 tokens_per_epoch=n_tokens,
                 completion_tokens_per_epoch=sum(len(ids) - n for ids, n in samples),
                 # fill = real tokens / row capacity: what padding would have wasted instead
                 pack_fill=round(n_tokens / (len(rows) * capacity), 4),
                 steps_per_epoch=-(-len(rows) // rows_per_step))

    fit(sft_worker, worker_config(cfg, ctx, student, fmt.end_of_turn), ctx.resources, ctx, rows)
    stats.update(read_stats(ctx))
    stats["zero_stage"] = ctx.resources.zero_stage
    ctx.stats.update(stats)
    return None


STAGE = Stage(
    name="sft",
    config=SFTConfig,
    reads=("select",),
    requires=("messages",),
    adds=(),
    run=run,
    output="model",
    resumable=True,  # the checkpoints of an interrupted run survive for the next try
)
