"""The packed trainer: one Ray Train worker's loop for sft and redi (cluster/train.py's fit
starts the workers), built on the packed forward (stages/lib/packed.py).

    train_packed(config, loss_fn)      a worker: model, packed rows, DeepSpeed ZeRO, checkpoints
    worker_config(cfg, ctx, …)         what the driver hands every worker
    read_stats(ctx)                    the workers' statistics, for the manifest
"""
from __future__ import annotations

import collections
import json
import os
import time

from cluster.train import (deepspeed_for_worker, finish, last_checkpoint, peak_memory_mb,
                           progress_callback, worker_env)
from pipeline.errors import UserError
from pipeline.store import Store
from stages.lib.packed import ATTENTION, collate, register_attention
from stages.lib.sequence_parallel import (enable as enable_sequence_parallel, grouped_rows,
                                          shard_row)


def upstream_drops(version, data_root: str) -> str:
    """'select dropped {...}; prune dropped {...}; …' — which filter emptied the data."""
    store, parts, todo, seen = Store(data_root), [], [version], set()
    while todo:
        v = todo.pop(0)
        if v.ref() in seen:
            continue
        seen.add(v.ref())
        drops = {k: n for k, n in (v.manifest.get("drops") or {}).items() if n}
        parts.append(f"{v.ref()} dropped {drops or 'nothing'} of {v.manifest.get('rows_in')} rows")
        for stage, ver in (v.manifest.get("inputs") or {}).items():
            found = store.find(stage, ver)
            if found is not None:
                todo.append(found)
    return "; ".join(parts)


def global_sum(value: float):
    """Sum of a number over all workers (a no-op on one)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(float(value), dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return t.item()


# --- the worker: one Ray Train process -----------------------------------------------------------

def packed_trainer_class(loss_fn, sequence_parallel: int = 1):
    """A transformers Trainer whose step is `loss_fn(model, packed_row) -> (loss, metrics)`.
    With `sequence_parallel` N > 1, N consecutive workers get the same row and each computes
    the loss of its slice (stages/lib/sequence_parallel.py).

    Metrics are averaged over each logging window and land in the logs (TensorBoard) and the
    manifest's lists. bench/train.py times exactly this class.
    """

    from transformers import Trainer

    class PackedTrainer(Trainer):
        metrics = collections.defaultdict(list)
        tokens = 0            # input tokens this run on this worker (no padding to count)
        calls = 0             # optimizer steps this run (one packed row per step)
        started = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.started is None:
                PackedTrainer.started = time.perf_counter()
            if sequence_parallel > 1:
                import torch.distributed as dist

                inputs = shard_row(inputs, dist.get_rank() % sequence_parallel,
                                   sequence_parallel)
            PackedTrainer.tokens += inputs["input_ids"].numel()
            PackedTrainer.calls += 1
            loss, metrics = loss_fn(model, inputs)
            for k, v in metrics.items():
                self.metrics[k].append(v)
            return loss

        def log(self, logs, start_time=None):
            if "loss" in logs:
                for k, vs in self.metrics.items():
                    logs[k] = sum(vs) / len(vs)
                self.metrics.clear()
            super().log(logs, start_time)

    return PackedTrainer


# Gradient checkpointing ("auto") above this many tokens in a packed row: from there the decoder
# layers' saved activations outgrow everything else a worker holds (docs/training.md derives it
# from the measured bytes per token).
CHECKPOINT_ABOVE = 8192


def gradient_checkpointing(setting, rows) -> bool:
    """resources.<stage>.gradient_checkpointing: true / false, or "auto" = on when the longest
    packed row exceeds CHECKPOINT_ABOVE tokens."""
    if setting == "auto":
        return max(len(r["input_ids"]) for r in rows) > CHECKPOINT_ABOVE
    return bool(setting)


def train_packed(config: dict, loss_fn, collate_fn=collate, callbacks=()) -> None:
    """Build the trainer for packed rows, train (resuming if a checkpoint exists), save, report.

    `loss_fn(model, batch) -> (loss, {metric: float})` (see packed_trainer_class).
    `collate_fn(items) -> batch`: packed.collate, or a stage's own that adds per-token arrays
    of its rows (kd: the teacher's top-k). `callbacks`: more transformers TrainerCallbacks (kd's
    TAID schedule, saved in each checkpoint's trainer_state.json).
    """
    worker_env(config)
    import ray
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    register_attention()
    rows = ray.get(config["rows"])
    sp = config.get("sequence_parallel", 1)
    if sp > 1:  # each row to a group of sp workers (stages/lib/sequence_parallel.py)
        rows = grouped_rows(rows, sp, config["seed"])
    checkpoint_dir = os.path.join(config["out_dir"], "checkpoints")
    use_gpu = config["use_gpu"]
    checkpointing = gradient_checkpointing(config.get("gradient_checkpointing", "auto"), rows)
    args = TrainingArguments(
        output_dir=checkpoint_dir,
        # each decoder layer recomputed in backward from its saved input (non-reentrant
        # torch.utils.checkpoint: the reentrant one needs inputs that require grad)
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        per_device_train_batch_size=1,           # one packed row per worker per step
        gradient_accumulation_steps=1,
        num_train_epochs=config["epochs"],
        max_steps=config["max_steps"] or -1,
        learning_rate=config["learning_rate"],
        lr_scheduler_type=config["lr_scheduler"],
        warmup_steps=config["warmup_ratio"],     # a float < 1 is a fraction of the steps
        weight_decay=config["weight_decay"],
        max_grad_norm=config["max_grad_norm"],
        bf16=use_gpu,                            # CPU trains in fp32
        use_cpu=not use_gpu,
        deepspeed=config["deepspeed"],
        seed=config["seed"],
        logging_steps=config["logging_steps"],
        save_strategy="steps" if config["save_steps"] else "no",
        save_steps=config["save_steps"] or 500,
        save_total_limit=1,
        report_to=[] if config["report_to"] == "none" else [config["report_to"]],
        remove_unused_columns=False,
        include_num_input_tokens_seen=True,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential" if sp > 1 else "random",  # grouped_rows' order
    )
    deepspeed_for_worker(config)
    model = AutoModelForCausalLM.from_pretrained(
        config["model_path"], attn_implementation=ATTENTION,
        dtype=torch.bfloat16 if use_gpu else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(config["model_path"])
    if sp > 1:
        enable_sequence_parallel(model, sp)

    PackedTrainer = packed_trainer_class(loss_fn, sp)
    trainer = PackedTrainer(model=model, args=args, train_dataset=rows, data_collator=collate_fn,
                            processing_class=tokenizer,
                            callbacks=[progress_callback(config["stage"]), *callbacks])
    resume = last_checkpoint(checkpoint_dir)
    trainer.train(resume_from_checkpoint=resume)
    elapsed = time.perf_counter() - (PackedTrainer.started or time.perf_counter())
    tokens = global_sum(PackedTrainer.tokens)
    history = [h for h in trainer.state.log_history if "loss" in h]
    losses = [round(h["loss"], 5) for h in history]
    stats = {
        "steps": trainer.state.global_step,
        "resumed_from_step": int(resume.rsplit("-", 1)[1]) if resume else 0,
        "steps_this_run": PackedTrainer.calls,   # after a resume: steps - resumed_from_step
        # the history of a resumed run includes the logs restored from the checkpoint
        "logged_steps": [h["step"] for h in history],
        "loss": losses,
        "final_loss": losses[-1] if losses else None,
        "mean_loss": round(sum(losses) / len(losses), 5) if losses else None,
        "tokens_seen": int(trainer.state.num_input_tokens_seen) // sp,  # sp copies of a row
        "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
        "train_s": round(elapsed, 2),
        "peak_memory_mb": peak_memory_mb(use_gpu),
        "workers": int(os.environ.get("WORLD_SIZE", "1")),
        "gradient_checkpointing": checkpointing,
        "sequence_parallel": sp,
    }
    for key in config["metric_lists"]:
        stats[key.replace("/", "_")] = [round(h[key], 5) for h in history if key in h]
    stop_on_end_of_turn(model, tokenizer, config["end_of_turn"])
    # The saved config must name an attention every loader has, not our registry entry.
    model.config._attn_implementation = "sdpa"
    finish(trainer, tokenizer, config["out_dir"], checkpoint_dir, stats)


def stop_on_end_of_turn(model, tokenizer, end_of_turn: str) -> None:
    """The saved generation config's EOS ids include the token every target ended with: vLLM
    and transformers' generate stop on those ids, so the student stops where it was taught to
    (a ChatML template on a base model: eos <|endoftext|>, end of turn <|im_end|>)."""
    eot = tokenizer.convert_tokens_to_ids(end_of_turn)
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if eot is not None and eot not in ids:
        model.generation_config.eos_token_id = ids + [eot] if ids else eot


def refuse_sequence_parallel(ctx, needs: str) -> None:
    """Exit 2 before any work when resources.<stage>.sequence_parallel is not 1 for a stage
    whose loss needs `needs` whole in one worker: stages/lib/sequence_parallel.py shard_row
    slices only sft's arrays (tokens, targets), not kd's top-k, redi's pairs or opd's recorded
    log-probs."""
    sp = ctx.resources.sequence_parallel
    if sp != 1:
        raise UserError(f"resources.{ctx.stage}.sequence_parallel: {sp!r} (only sft splits a "
                        f"row across workers; {ctx.stage} needs {needs} in one worker: use 1)")


def worker_config(cfg, ctx, model_path: str, end_of_turn: str) -> dict:
    """What every worker gets besides its rows: the schedule knobs, where to write and the stop
    token the targets end with (saved as the model's EOS: stop_on_end_of_turn). The rows go to
    `fit(..., rows=rows)`, which hands them over through Ray's object store."""
    return {
        "model_path": model_path, "out_dir": ctx.out_dir,
        "epochs": cfg.epochs, "max_steps": cfg.max_steps, "learning_rate": cfg.learning_rate,
        "warmup_ratio": cfg.warmup_ratio, "lr_scheduler": cfg.lr_scheduler,
        "weight_decay": cfg.weight_decay, "max_grad_norm": cfg.max_grad_norm, "seed": cfg.seed,
        "save_steps": cfg.save_steps, "logging_steps": cfg.logging_steps,
        "report_to": cfg.report_to, "metric_lists": [], "end_of_turn": end_of_turn,
    }


def read_stats(ctx) -> dict:
    with open(os.path.join(ctx.out_dir, "train_stats.json"), encoding="utf-8") as f:
        return json.load(f)
