"""Stage `redi` — Reinforcement Distillation (REDI stage 2): learn from the bad traces too.

Reads `select` (split `pairs`: TRL's conversational preference format `prompt, chosen,
rejected`) and `sft` (the stage-1 checkpoint it starts from), trains under DeepSpeed ZeRO on Ray
Train workers, and writes a Hugging Face checkpoint folder as its version.

    distillery run redi --recipe configs/tiny.yaml redi.alpha=0.8

The loss (docs/methods.md, arXiv 2505.24850) is reference-free:

    L = − log π(y+|x) / |y+|  +  α · log π(y−|x) / |y−|

with log π(y|x) the summed log-probability of the completion tokens and |y| their count. Chosen
and rejected traces of a step are packed into one padding-free row and scored in a single
forward pass (stages/sft.py's packed step). `loss: dpo | simpo` trains the same pairs with TRL's
DPOTrainer (with its reference model) / CPOTrainer's SimPO loss instead, for comparison.
"""
from __future__ import annotations

import functools
import logging
import os
import random
import time
from dataclasses import dataclass

from cluster.train import (deepspeed_for_worker, finish, fit, last_checkpoint, peak_memory_mb,
                           worker_env)
from pipeline.errors import UserError
from pipeline.stage import Stage
from stages.lib.chat import check_chat_format, target_format, target_texts
from stages.lib.packed import completion_logps, encode, fit_length, packed_row
from stages.lib.trainer import (global_sum, read_stats, refuse_sequence_parallel,
                                stop_on_end_of_turn, train_packed, upstream_drops, worker_config)

log = logging.getLogger(__name__)


@dataclass
class REDIConfig:
    """Knobs of the REDI stage (defaults: docs/methods.md, REDI stage 2).

    loss: "redi" (ours, packed), or the baselines "dpo" (TRL DPOTrainer, sigmoid loss, with a
      frozen reference copy of the SFT model) and "simpo" (TRL CPOTrainer, loss_type="simpo").
    alpha: weight of the rejected trace's length-normalized log-prob (0 = SFT on the positives;
      1 = symmetric, which collapses at LR 1e-6 per the paper).
    beta: DPO's / SimPO's inverse temperature (TRL default 0.1; the SimPO paper uses ~2).
    simpo_gamma: SimPO's target reward margin.
    epochs / max_steps / learning_rate / warmup_ratio / lr_scheduler / weight_decay /
      max_grad_norm: the schedule (1 epoch, peak LR 1e-6, 10% warm-up, linear, 1e-4).
    max_length: longest prompt + completion per side in tokens; `overlong` as in sft
      ("truncate" the completion's tail, or "drop" the pair; counted).
    pairs_per_step: pairs in one optimizer step, all workers together (METHODS: 32); each worker
      scores pairs_per_step / num_workers pairs, chosen and rejected in one packed row.
    collapse_margin: warn when the mean length-normalized log-probs of chosen AND rejected have
      both fallen more than this many nats/token below their first logged values.
    seed / save_steps / logging_steps / report_to: as in sft.
    chat_template / prompt_format / reasoning_tags: as in sft (use the values sft used).
    """

    loss: str = "redi"
    alpha: float = 0.8
    beta: float = 0.1
    simpo_gamma: float = 0.5
    epochs: float = 1.0
    max_steps: int = 0
    learning_rate: float = 1e-6
    warmup_ratio: float = 0.1
    lr_scheduler: str = "linear"
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    max_length: int = 4096
    overlong: str = "truncate"
    pairs_per_step: int = 32
    collapse_margin: float = 0.05
    seed: int = 0
    chat_template: str = ""
    prompt_format: str = "chat"
    reasoning_tags: str = "think"
    save_steps: int = 50
    logging_steps: int = 1
    report_to: str = "tensorboard"


def redi_loss(chosen_logps, chosen_lengths, rejected_logps, rejected_lengths, alpha: float):
    """Mean over pairs of  −logπ(y+|x)/|y+| + α·logπ(y−|x)/|y−|.

    chosen_logps / rejected_logps: [pairs] summed completion-token log-probs; *_lengths: [pairs]
    completion token counts. Returns a scalar tensor.
    """
    return (-chosen_logps / chosen_lengths + alpha * rejected_logps / rejected_lengths).mean()


def collapse_message(chosen: list[float], rejected: list[float], margin: float) -> str | None:
    """A warning when both normalized log-probs fell together (REDI's collapse signature).

    Compares the mean of the first and of the last few logged values (up to 4; single steps are
    noisy) of each list.
    """
    w = min(4, len(chosen) // 2)
    if w < 1:
        return None
    c0, c1 = sum(chosen[:w]) / w, sum(chosen[-w:]) / w
    r0, r1 = sum(rejected[:w]) / w, sum(rejected[-w:]) / w
    if c1 < c0 - margin and r1 < r0 - margin:
        return (f"REDI collapse: both log-probs are falling — chosen {c0:.3f} -> {c1:.3f}, "
                f"rejected {r0:.3f} -> {r1:.3f} nats/token; lower redi.alpha or "
                "redi.learning_rate")
    return None


def pair_logps(model, batch, alpha: float | None = None):
    """Summed completion log-probs and token counts of each chosen / rejected trace in a row.

    The row holds chosen_0, rejected_0, chosen_1, rejected_1, … (stages/sft.py packed_row), so
    the even sequences are the chosen ones and the odd ones the rejected. With `alpha`, the
    caller's loss is redi_loss: linear in the token log-probs, d(loss)/d(logp) = -1/|y+| for a
    chosen token and alpha/|y-| for a rejected one (over the pairs' count), so the LM head takes
    its gradients in the forward (stages/lib/lm_head.py, fused: no recomputed logits).
    """
    import torch

    n = batch["n_seqs"]
    seq = batch["keep_seq"]
    weights = None
    if alpha is not None:
        counts = torch.bincount(seq, minlength=n).float()
        per_seq = torch.where(torch.arange(n, device=seq.device) % 2 == 0, -1.0, alpha)
        weights = (per_seq / counts.clamp(min=1))[seq]
    token_logps = completion_logps(model, batch, weights=weights)       # [K]
    sums = torch.zeros(n, dtype=token_logps.dtype, device=token_logps.device)
    sums = sums.index_add(0, seq, token_logps)                           # [2 * pairs]
    lengths = torch.bincount(seq, minlength=n).to(token_logps.dtype)
    return sums[0::2], lengths[0::2], sums[1::2], lengths[1::2]


class CollapseWatch:
    """Warns once, during training, when the logged chosen and rejected log-probs fall together."""

    def __init__(self, margin: float):
        self.margin, self.chosen, self.rejected, self.warned = margin, [], [], False

    def __call__(self, chosen: float, rejected: float) -> None:
        self.chosen.append(chosen)
        self.rejected.append(rejected)
        if self.warned or len(self.chosen) < 8:
            return
        message = collapse_message(self.chosen, self.rejected, self.margin)
        if message:
            log.warning(message)
            self.warned = True


def redi_batch_loss(model, batch, alpha: float, watch: CollapseWatch):
    chosen, chosen_len, rejected, rejected_len = pair_logps(model, batch, alpha)
    loss = redi_loss(chosen, chosen_len, rejected, rejected_len, alpha)
    # Logged values are means over all workers' pairs of this step.
    n = global_sum(len(chosen))
    c = global_sum((chosen / chosen_len).sum().item()) / n
    r = global_sum((rejected / rejected_len).sum().item()) / n
    watch(c, r)
    return loss, {"logps/chosen": c, "logps/rejected": r}


def redi_worker(config: dict) -> None:
    loss_fn = functools.partial(redi_batch_loss, alpha=config["alpha"],
                                watch=CollapseWatch(config["collapse_margin"]))
    train_packed(config, loss_fn)


def trl_pair_worker(config: dict) -> None:
    """The baselines: TRL's DPOTrainer (`dpo`) or CPOTrainer with the SimPO loss (`simpo`)."""
    worker_env(config)

    import datasets
    import ray
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    use_gpu = config["use_gpu"]
    checkpoint_dir = os.path.join(config["out_dir"], "checkpoints")
    common = dict(
        output_dir=checkpoint_dir, per_device_train_batch_size=config["pairs_per_worker"],
        gradient_accumulation_steps=1, num_train_epochs=config["epochs"],
        max_steps=config["max_steps"] or -1, learning_rate=config["learning_rate"],
        lr_scheduler_type=config["lr_scheduler"], warmup_steps=config["warmup_ratio"],
        weight_decay=config["weight_decay"], max_grad_norm=config["max_grad_norm"],
        bf16=use_gpu, use_cpu=not use_gpu, deepspeed=config["deepspeed"], seed=config["seed"],
        logging_steps=config["logging_steps"],
        save_strategy="steps" if config["save_steps"] else "no",
        save_steps=config["save_steps"] or 500, save_total_limit=1,
        report_to=[] if config["report_to"] == "none" else [config["report_to"]],
        max_length=config["max_length"] * 2,  # TRL counts prompt + completion once per side
        beta=config["beta"],
    )
    if config["loss"] == "dpo":
        from trl import DPOConfig as TRLConfig, DPOTrainer as TRLTrainer

        args = TRLConfig(loss_type=["sigmoid"], **common)
    else:
        from trl.experimental.cpo import CPOConfig as TRLConfig, CPOTrainer as TRLTrainer

        args = TRLConfig(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=config["simpo_gamma"],
                         **common)
    deepspeed_for_worker(config)
    model = AutoModelForCausalLM.from_pretrained(
        config["model_path"], dtype=torch.bfloat16 if use_gpu else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(config["model_path"])
    # TRL appends its tokenizer's EOS to a text answer that does not end with it: the targets
    # end with the student's end of turn, so that is the EOS it must see (and saves).
    tokenizer.eos_token = config["end_of_turn"]
    stop_on_end_of_turn(model, tokenizer, config["end_of_turn"])
    dataset = datasets.Dataset.from_list(ray.get(config["rows"]))
    trainer = TRLTrainer(model=model, args=args, train_dataset=dataset,
                         processing_class=tokenizer)
    resume = last_checkpoint(checkpoint_dir)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    elapsed = time.perf_counter() - started
    history = [h for h in trainer.state.log_history if "loss" in h]
    losses = [round(h["loss"], 5) for h in history]
    stats = {
        "steps": trainer.state.global_step,
        "resumed_from_step": int(resume.rsplit("-", 1)[1]) if resume else 0,
        "logged_steps": [h["step"] for h in history],
        "loss": losses,
        "final_loss": losses[-1] if losses else None,
        "mean_loss": round(sum(losses) / len(losses), 5) if losses else None,
        "train_s": round(elapsed, 2),
        "pairs_per_s": round(trainer.state.global_step * config["pairs_per_worker"]
                             * int(os.environ.get("WORLD_SIZE", "1")) / elapsed, 2),
        "peak_memory_mb": peak_memory_mb(use_gpu),
        # TRL logs summed (not length-normalized) log-probs for these
        "logps_chosen_sum": [round(h["logps/chosen"], 4) for h in history if "logps/chosen" in h],
        "logps_rejected_sum": [round(h["logps/rejected"], 4) for h in history
                               if "logps/rejected" in h],
    }
    finish(trainer, tokenizer, config["out_dir"], checkpoint_dir, stats)


def run(cfg: REDIConfig, inputs, ctx):
    from transformers import AutoTokenizer

    if cfg.loss not in ("redi", "dpo", "simpo"):
        raise UserError(f"redi.loss: '{cfg.loss}' (use 'redi', 'dpo' or 'simpo')")
    if cfg.overlong not in ("truncate", "drop"):
        raise UserError(f"redi.overlong: '{cfg.overlong}' (use 'truncate' or 'drop')")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise UserError(f"redi.alpha: {cfg.alpha} is outside [0, 1]")
    refuse_sequence_parallel(ctx, "each pair's whole row")  # pair_logps sums over pairs
    workers = ctx.resources.num_workers
    per_worker = cfg.pairs_per_step // workers  # 32 pairs / 8 workers = 4 pairs per row
    if per_worker < 1:
        raise UserError(f"redi.pairs_per_step={cfg.pairs_per_step} is fewer than the "
                        f"{workers} workers: each worker needs at least one pair per step")
    start = inputs["sft"].path  # the SFT checkpoint folder is the student REDI starts from
    template = check_chat_format(start, cfg.chat_template, cfg.prompt_format, "redi", "student")
    tokenizer = AutoTokenizer.from_pretrained(start)
    fmt = target_format(tokenizer, start, template, cfg.prompt_format, cfg.reasoning_tags,
                        "redi.student")
    source = inputs["select"]
    table = source.read_table("pairs", columns=["prompt", "chosen", "rejected"])
    if table.num_rows == 0:
        raise UserError(f"redi: {source.ref()} has no pairs (split 'pairs' is empty — a problem "
                        "needs one verified-correct and one incorrect trace): "
                        f"{upstream_drops(source, ctx.data_root)}")

    pairs, stats = [], {"truncated": 0}
    for i, row in enumerate(table.to_pylist()):
        sides = []
        for side in ("chosen", "rejected"):
            if not row[side] or row[side][-1]["role"] != "assistant":
                raise UserError(f"redi: {source.ref()} split 'pairs' row {i}: '{side}' must end "
                                "with an assistant message")
            ids, n_prompt, outcome = fit_length(
                *encode(tokenizer, row["prompt"], row[side][-1]["content"], fmt),
                cfg.max_length, cfg.overlong)
            sides.append((ids, n_prompt, outcome))
        dropped = [o for ids, _, o in sides if ids is None]
        if dropped:
            ctx.drops[dropped[0]] += 1
            continue
        stats["truncated"] += sum(o == "truncated" for _, _, o in sides)
        pairs.append((row, sides))
    if not pairs:
        raise UserError(f"redi: every one of the {table.num_rows} pairs was dropped "
                        f"({dict(ctx.drops)}); raise redi.max_length or use redi.overlong=truncate")

    random.Random(cfg.seed).shuffle(pairs)
    stats.update(pairs=len(pairs), pairs_per_worker=per_worker,
                 steps_per_epoch=-(-len(pairs) // (per_worker * workers)),
                 start=inputs["sft"].ref())
    if cfg.loss == "redi":
        # One packed row per worker and step: chosen_0, rejected_0, chosen_1, rejected_1, …
        rows = [packed_row([(ids, n) for _, sides in pairs[k:k + per_worker]
                            for ids, n, _ in sides])
                for k in range(0, len(pairs), per_worker)]
        config = worker_config(cfg, ctx, start, fmt.end_of_turn)
        config.update(alpha=cfg.alpha, collapse_margin=cfg.collapse_margin,
                      metric_lists=["logps/chosen", "logps/rejected"])
        fit(redi_worker, config, ctx.resources, ctx, rows)
    else:
        # TRL's text form: the rendered prompt and each side's target (the student's own form
        # of the trace, ending with its stop token), never the messages its template re-renders.
        rows = []
        for row, _ in pairs:
            prompt, chosen, _ = target_texts(tokenizer, row["prompt"],
                                             row["chosen"][-1]["content"], fmt)
            _, rejected, _ = target_texts(tokenizer, row["prompt"],
                                          row["rejected"][-1]["content"], fmt)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        config = worker_config(cfg, ctx, start, fmt.end_of_turn)
        config.update(loss=cfg.loss, beta=cfg.beta, simpo_gamma=cfg.simpo_gamma,
                      max_length=cfg.max_length, pairs_per_worker=per_worker)
        fit(trl_pair_worker, config, ctx.resources, ctx, rows)
    stats.update(read_stats(ctx))
    if cfg.loss == "redi":
        warning = collapse_message(stats["logps_chosen"], stats["logps_rejected"],
                                   cfg.collapse_margin)
        if warning:
            log.warning(warning)
            stats["collapse_warning"] = warning
    stats["zero_stage"] = ctx.resources.zero_stage
    ctx.stats.update(stats)
    return None


STAGE = Stage(
    name="redi",
    config=REDIConfig,
    reads=("select", "sft"),
    requires=("prompt", "chosen", "rejected"),
    adds=(),
    run=run,
    output="model",
    resumable=True,  # the checkpoints of an interrupted run survive for the next try
)
