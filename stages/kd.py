"""Stage `kd` — logit distillation: the student learns the teacher's next-token distributions.

Reads `distributions` (select's SFT rows plus, at every completion token the student trains on,
the teacher's top-k ids and log-probs: `topk_ids`, `topk_logps`, `completion_ids`, …), trains the
original student (the recipe's `student`, as sft does) under DeepSpeed ZeRO on Ray Train workers
(cluster/train.py, stages/lib/trainer.py train_packed) and writes a Hugging Face checkpoint
folder as its version.

    distillery run kd --recipe configs/tiny.yaml kd.divergence=forward_kl kd.kd_ratio=0.5

The loss over the completion tokens of the whole global step (token mean, as sft's):

    L = (1 - kd_ratio) CE + kd_ratio D(p_T || q_S)

with CE the trace token's negative log-likelihood and D one of stages/lib/divergences.py's
DIVERGENCES on the teacher's top-k support plus a tail bucket. `taid` interpolates its target
with the student and moves t by TaidSchedule once per optimizer step (logged, checkpointed).

The student's full-vocabulary logits never exist for a whole packed row: the per-position loss
comes from stages/lib/topk_loss.py (kd_token_losses: the model's LM head computes the loss terms
`CHUNK` positions at a time, each chunk checkpointed; ZeRO-3 still gathers the head's weight).

MixKD (`online_teacher`): the teacher, frozen in every worker, scores packed rows of mixed
sequences (two samples' embeddings interpolated with lambda ~ Beta(a, a): mixed_row,
_mixed_embeddings) and the student's D to it on the same mixed input is added to L with
`mixup_weight`. docs/kd.md is the guide.
"""
from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import os
import random
from dataclasses import dataclass

from cluster.train import fit, worker_env
from pipeline.errors import UserError
from pipeline.stage import Stage
from stages.lib.chat import check_chat_format, target_format
from stages.lib.divergences import DIVERGENCES, TaidSchedule
from stages.lib.lm_head import module_forward
from stages.lib.packed import (ATTENTION, collate, encode, fit_length, pack, packed_row,
                               register_attention)
from stages.lib.topk import teacher_topk
from stages.lib.topk_loss import KdLoss, kd_token_losses
from stages.lib.trainer import (global_sum, read_stats, refuse_sequence_parallel, train_packed,
                                upstream_drops, worker_config)

# The teacher's per-token columns a distributions row carries (stages/distributions.py).
TEACHER_COLUMNS = ("topk_ids", "topk_logps", "completion_ids")


@dataclass
class KdConfig:
    """Knobs of the kd stage. The training schedule is sft's (SFTConfig documents each):

    student: the model to train (hub id or local path); the recipe's top-level `student` fills
      it. kd starts from the original student, as sft does, not from sft's checkpoint.
    epochs / max_steps / learning_rate / warmup_ratio / lr_scheduler / weight_decay /
      max_grad_norm / max_length / overlong / tokens_per_step / seed / save_steps /
      logging_steps / report_to / chat_template / prompt_format / reasoning_tags: as in sft.
      chat_template / prompt_format / reasoning_tags must be those distributions used: the
      teacher's arrays are aligned to exactly these completion tokens (checked per row).
    kd_ratio: weight of the divergence against cross-entropy, in [0, 1]:
      L = (1 - kd_ratio) CE + kd_ratio D (docs/methods.md: torchtune and DistillKit use 0.5).
    divergence: D, one of DIVERGENCES: forward_kl, reverse_kl, jsd, skew_kl, skew_rkl, taid
      (formulas in stages/lib/divergences.py and docs/kd.md).
    beta: jsd's mixture weight (TRL GKD's; 0 = forward KL, 1 = reverse KL).
    skew_alpha: skew_kl / skew_rkl's alpha (DistiLLM: 0.1).
    taid_t_start / taid_t_end / taid_alpha / taid_momentum: TAID's interpolation t, from
      t_start towards t_end, moved by alpha sigmoid(momentum-averaged relative loss decrease)
      each optimizer step (SakanaAI/TAID: 0.4, 1.0, 5e-4, 0.99).
    online_teacher: MixKD (arXiv 2011.00593): load `teacher` frozen in every training worker
      and add the mixup term (MixKD below); off: the stored distributions only.
    teacher: the online teacher (hub id or local path); the recipe's top-level `teacher` fills
      it. It must have the student's tokenizer. Read only with online_teacher.
    mixup_alpha: a of lambda ~ Beta(a, a), the interpolation weight of two samples' embeddings
      (MixKD: 0.4; small a puts lambda near 0 or 1, i.e. mostly one of the two samples).
    mixup_weight: weight of the mixup term added to L (MixKD weighs its terms 1).
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
    kd_ratio: float = 0.5
    divergence: str = "forward_kl"
    beta: float = 0.5
    skew_alpha: float = 0.1
    taid_t_start: float = 0.4
    taid_t_end: float = 1.0
    taid_alpha: float = 5e-4
    taid_momentum: float = 0.99
    online_teacher: bool = False
    teacher: str = ""
    mixup_alpha: float = 0.4
    mixup_weight: float = 1.0


def collate_kd(items: list[dict]) -> dict:
    """packed.collate plus the teacher's top-k of the row's completion positions."""
    import torch

    (row,) = items
    batch = collate(items)
    batch["topk_ids"] = torch.tensor(row["topk_ids"])                  # [K, k] int32
    batch["topk_logps"] = torch.tensor(row["topk_logps"])              # [K, k] fp16
    return batch


class TaidState:
    """The TAID schedule inside a worker: the loss reads `t`, records the step's divergence
    `J`; the callback (taid_callback) folds J in after each optimizer step."""

    def __init__(self, schedule: TaidSchedule):
        self.schedule, self.last_j = schedule, None


def taid_callback(taid: TaidState):
    """A transformers TrainerCallback that updates t after each optimizer step with that step's
    divergence, and is saved with each checkpoint's trainer_state.json (ExportableState): a
    resumed run continues from the checkpoint's t, momentum and previous loss."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    class TaidCallback(TrainerCallback, ExportableState):
        def state(self) -> dict:
            return {"args": {}, "attributes": taid.schedule.state_dict()}

        def on_train_begin(self, args, state, control, **kwargs):
            saved = (state.stateful_callbacks or {}).get(type(self).__name__)
            if state.global_step and saved:  # resumed: the checkpoint's schedule
                taid.schedule.load_state_dict(saved["attributes"])

        def on_step_end(self, args, state, control, **kwargs):
            taid.schedule.update(state.global_step, taid.last_j)

    return TaidCallback()


# --- MixKD: the mixup term with an online teacher ---------------------------------------------

class MixKd:
    """One worker's MixKD: the frozen online teacher, the Beta(a, a) draws and the term's
    weight. `vocab` is the student's (the teacher's top-k is taken over the student's ids)."""

    def __init__(self, teacher, alpha: float, weight: float, vocab: int, seed: int):
        self.teacher, self.alpha, self.weight, self.vocab = teacher, alpha, weight, vocab
        self.rng = random.Random(seed)


def load_teacher(path: str, use_gpu: bool):
    """The online teacher, frozen, in eval mode, on this worker's device (bf16 on GPU, fp32 on
    CPU). Called before the trainer exists: under ZeRO-3 the trainer's DeepSpeed config makes
    from_pretrained partition weights (zero.Init), which a model no engine owns cannot use."""
    import torch
    from transformers import AutoModelForCausalLM

    register_attention()
    device = "cpu"
    if use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation=ATTENTION,
        dtype=torch.bfloat16 if use_gpu else torch.float32).to(device).eval()
    return model.requires_grad_(False)


def mixed_row(batch, alpha: float, rng: random.Random) -> dict:
    """A packed row of mixed sequences from the samples of `batch` (collate's packed row).

    The row's samples are paired at random (an odd one out pairs with a random sample, perhaps
    itself). A pair (a, b) gives one sequence of m = min(L_a, L_b) positions whose embedding at
    position i is lam e(a_i) + (1 - lam) e(b_i), lam ~ Beta(alpha, alpha) per pair (MixKD). Its
    loss positions are those where both samples are in their completion: from max(n_a, n_b) - 1
    (n = prompt length; position p predicts token p + 1) to m - 2. A pair with none is left
    out; a row left with no pair mixes its longest sample with itself (the sample unmixed), so
    every worker runs the same forwards (ZeRO-3's gathers are collective).

    Returns packed-row tensors on the batch's device: input_ids (sample a's ids), position_ids,
    cu_seqlens, max_seqlen, keep, targets (a's next tokens: only CE reads them, at weight 0),
    and other_ids (b's ids) and lam [T] for the embedding mix (_mixed_embeddings).
    """

    import torch

    device = batch["input_ids"].device
    ids = batch["input_ids"][0].tolist()
    cu = batch["cu_seqlens"].tolist()
    keep = batch["keep"].tolist()
    lengths = [cu[i + 1] - cu[i] for i in range(len(cu) - 1)]
    # the first kept position of sample i is its prompt's last token: n_i - 1 after its start
    prompt = [keep[bisect.bisect_left(keep, cu[i])] - cu[i] + 1 for i in range(len(lengths))]
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pairs = list(zip(order[0::2], order[1::2]))
    if len(order) % 2:
        pairs.append((order[-1], rng.choice(order)))
    a_ids, b_ids, lam, pos, kept, bounds = [], [], [], [], [], [0]
    for a, b in pairs:
        m = min(lengths[a], lengths[b])
        first = max(prompt[a], prompt[b]) - 1
        if first >= m - 1:
            continue
        at = len(a_ids)
        a_ids += ids[cu[a]:cu[a] + m]
        b_ids += ids[cu[b]:cu[b] + m]
        lam += [rng.betavariate(alpha, alpha)] * m
        pos += range(m)
        kept += range(at + first, at + m - 1)
        bounds.append(len(a_ids))
    if not kept:
        a = max(range(len(lengths)), key=lengths.__getitem__)
        a_ids = b_ids = ids[cu[a]:cu[a + 1]]
        lam, pos, bounds = [1.0] * lengths[a], list(range(lengths[a])), [0, lengths[a]]
        kept = list(range(prompt[a] - 1, lengths[a] - 1))

    def tensor(x, dtype=torch.long):
        return torch.tensor(x, dtype=dtype, device=device)

    return {"input_ids": tensor(a_ids)[None], "position_ids": tensor(pos)[None],
            "cu_seqlens": tensor(bounds, torch.int32),
            "max_seqlen": max(b - a for a, b in zip(bounds, bounds[1:])),
            "keep": tensor(kept), "targets": tensor([a_ids[p + 1] for p in kept]),
            "other_ids": tensor(b_ids), "lam": tensor(lam, torch.float32)}


@contextlib.contextmanager
def _mixed_embeddings(model, other_ids, lam):
    """Within the block, the model's input embedding of ids x [1, T] returns
    lam e(x) + (1 - lam) e(other_ids), position by position. The embedding module is still
    called by the model's forward, so ZeRO-3 gathers its weight as usual; its own forward
    (e.g. a scaled embedding) computes both terms."""
    emb = model.get_input_embeddings()
    original = emb.forward

    def forward(x, *args, **kwargs):
        e_a = original(x, *args, **kwargs)
        e_b = original(other_ids.view_as(x), *args, **kwargs)
        w = lam.view(*x.shape, 1).to(e_a.dtype)
        return w * e_a + (1.0 - w) * e_b

    with module_forward(emb, forward):
        yield


def mixup_token_losses(model, batch, spec: KdLoss, mix: MixKd):
    """The MixKD term's per-position divergence [K'] (with gradient) on a mixed row of `batch`
    (mixed_row): the online teacher's top-k (k = the stored k) on its own embeddings mixed
    with the same lam, the student's D to it on its mixed embeddings (kd_ratio 1: a mixed
    position has no trace token for CE)."""

    row = mixed_row(batch, mix.alpha, mix.rng)
    k = batch["topk_ids"].shape[-1]
    with _mixed_embeddings(mix.teacher, row["other_ids"], row["lam"]):
        top = teacher_topk(mix.teacher, row, k, mix.vocab)
    row["topk_ids"], row["topk_logps"] = top["ids"], top["logps"]
    with _mixed_embeddings(model, row["other_ids"], row["lam"]):
        losses, _, _ = kd_token_losses(model, row, dataclasses.replace(spec, kd_ratio=1.0))
    return losses


def kd_batch_loss(model, batch, spec: KdLoss, taid: TaidState | None, mix: MixKd | None = None):
    """The global step's token mean of the loss, as sft_loss: each worker's sum over its tokens
    x world / (completion tokens of all workers); the logged CE, D (and t) are global means.
    With MixKD, + mixup_weight x the global mean of the mixup term over its positions."""

    import torch.distributed as dist

    if taid is not None:
        spec = dataclasses.replace(spec, t=taid.schedule.t)
    losses, ce, d = kd_token_losses(model, batch, spec)
    world = dist.get_world_size() if dist.is_initialized() else 1
    n_global = global_sum(losses.numel())
    metrics = {"kd/ce": global_sum(ce.sum().item()) / n_global,
               "kd/divergence": global_sum(d.sum().item()) / n_global}
    if taid is not None:
        taid.last_j = metrics["kd/divergence"]
        metrics["kd/taid_t"] = spec.t
    loss = losses.sum() * (world / n_global)
    if mix is not None:
        mixed = mixup_token_losses(model, batch, spec, mix)
        n_mix = global_sum(mixed.numel())
        metrics["kd/mixup"] = global_sum(mixed.detach().sum().item()) / n_mix
        loss = loss + mix.weight * mixed.sum() * (world / n_mix)
    return loss, metrics


def kd_worker(config: dict) -> None:
    import torch.distributed as dist

    spec = KdLoss(config["divergence"], config["kd_ratio"], config["beta"], config["skew_alpha"])
    taid = None
    if config["divergence"] == "taid":
        taid = TaidState(TaidSchedule(config["total_steps"], config["taid_t_start"],
                                      config["taid_t_end"], config["taid_alpha"],
                                      config["taid_momentum"]))
    mix = None
    if config.get("online_teacher"):
        worker_env(config)
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        mix = MixKd(load_teacher(config["teacher"], config["use_gpu"]), config["mixup_alpha"],
                    config["mixup_weight"], config["student_vocab"], config["seed"] * 1000 + rank)
    loss_fn = functools.partial(kd_batch_loss, spec=spec, taid=taid, mix=mix)
    train_packed(config, loss_fn, collate_fn=collate_kd,
                 callbacks=[taid_callback(taid)] if taid else [])


# --- the stage -----------------------------------------------------------------------------------

def check_config(cfg: KdConfig) -> None:
    """Every knob kd alone has, checked in the driver before anything loads."""
    if cfg.overlong not in ("truncate", "drop"):
        raise UserError(f"kd.overlong: '{cfg.overlong}' (use 'truncate' or 'drop')")
    if not 0.0 <= cfg.kd_ratio <= 1.0:
        raise UserError(f"kd.kd_ratio: {cfg.kd_ratio} is outside [0, 1] "
                        "(L = (1 - kd_ratio) CE + kd_ratio D)")
    if cfg.divergence not in DIVERGENCES:
        raise UserError(f"kd.divergence: '{cfg.divergence}' is not one of "
                        f"{', '.join(DIVERGENCES)}")
    for key, value, low, high in (("beta", cfg.beta, 0.0, 1.0),
                                  ("skew_alpha", cfg.skew_alpha, 0.0, 1.0),
                                  ("taid_alpha", cfg.taid_alpha, 0.0, 1.0),
                                  ("taid_momentum", cfg.taid_momentum, 0.0, 1.0)):
        if not low <= value <= high:
            raise UserError(f"kd.{key}: {value} is outside [{low}, {high}]")
    if not 0.0 <= cfg.taid_t_start < 1.0:
        raise UserError(f"kd.taid_t_start: {cfg.taid_t_start} is outside [0, 1)")
    if not cfg.taid_t_start <= cfg.taid_t_end <= 1.0 or cfg.taid_t_end == 0.0:
        raise UserError(f"kd.taid_t_end: {cfg.taid_t_end} must be in (0, 1] and >= "
                        f"kd.taid_t_start ({cfg.taid_t_start})")
    if cfg.online_teacher:
        if cfg.mixup_alpha <= 0.0:
            raise UserError(f"kd.mixup_alpha: {cfg.mixup_alpha} must be > 0 "
                            "(lambda ~ Beta(a, a))")
        if cfg.mixup_weight < 0.0:
            raise UserError(f"kd.mixup_weight: {cfg.mixup_weight} must be >= 0")
        if not cfg.teacher:
            raise UserError("kd.teacher: kd.online_teacher (MixKD) needs a teacher: set the "
                            "recipe's top-level `teacher` or kd.teacher")


# What a worker may spend on the online teacher's weights: the rest of its memory holds the
# student's weights, gradients, optimizer state and activations.
TEACHER_SHARE = 0.5


def check_online_teacher(cfg: KdConfig, tokenizer, resources) -> None:
    """MixKD's teacher, checked in the driver before any worker loads it: the student's
    tokenizer (the mixed embeddings are of the same ids in both models), and weights that fit:
    on CPU, one fp32 copy per worker on this machine within TEACHER_SHARE of the memory
    available now; on GPU, one bf16 copy within TEACHER_SHARE of a GPU's memory (checked when
    the driver sees a GPU of the kind the workers get)."""
    import psutil
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        theirs = AutoTokenizer.from_pretrained(cfg.teacher)
        config = AutoConfig.from_pretrained(cfg.teacher)
    except (OSError, ValueError) as e:
        raise UserError(f"kd.teacher: cannot load '{cfg.teacher}': {e}") from e
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise UserError(f"kd.teacher: MixKD needs the student's tokenizer, and '{cfg.teacher}' "
                        f"has another vocabulary than kd.student '{cfg.student}' "
                        f"({len(theirs)} vs {len(tokenizer)} entries): cross-tokenizer "
                        "distillation is not supported")
    with init_empty_weights():
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    per_param = 2 if resources.use_gpu else 4       # bf16 on GPU, fp32 on CPU
    need = params * per_param
    if resources.use_gpu:
        if not torch.cuda.is_available():
            return
        have = torch.cuda.get_device_properties(0).total_memory
        where, copies = "of one GPU's memory", 1
    else:
        have = psutil.virtual_memory().available
        where, copies = "of the memory available on this machine", resources.num_workers
    if need * copies > TEACHER_SHARE * have:
        raise UserError(
            f"kd.online_teacher: the teacher '{cfg.teacher}' would not fit: {params / 1e6:,.1f}M "
            f"parameters x {per_param} B x {copies} worker(s) = {need * copies / 2**20:,.0f} MiB, "
            f"over {TEACHER_SHARE:.0%} {where} ({have / 2**20:,.0f} MiB; the rest holds the "
            "student's training state); use fewer workers or a smaller teacher, or turn "
            "kd.online_teacher off")


def teacher_arrays(source, split: str | None):
    """(table, per row (ids [n, k] int32, logps [n, k] as stored (fp16), completion ids [n]),
    or None where the row has no distribution) from a distributions version."""
    import numpy as np

    table = source.read_table(split)
    out = []
    if table.num_rows == 0:
        return table, out
    cols = {c: table.column(c).combine_chunks() for c in TEACHER_COLUMNS}
    for i in range(table.num_rows):
        ids, lps, comp = (cols[c][i] for c in TEACHER_COLUMNS)
        if not ids.is_valid or not lps.is_valid or not comp.is_valid or len(ids) == 0:
            out.append(None)
            continue
        k = len(ids.values[0])
        out.append((np.asarray(ids.values.flatten(), dtype=np.int32).reshape(-1, k),
                    np.asarray(lps.values.flatten()).reshape(-1, k),
                    np.asarray(comp.values, dtype=np.int64)))
    return table, out


def run(cfg: KdConfig, inputs, ctx):
    import numpy as np
    from transformers import AutoConfig, AutoTokenizer

    refuse_sequence_parallel(ctx, "each position's stored top-k beside its token")
    check_config(cfg)
    workers = ctx.resources.num_workers
    capacity = cfg.tokens_per_step // workers  # e.g. 16,384 tokens / 8 workers = 2,048 per row
    if capacity < cfg.max_length:
        raise UserError(f"kd.tokens_per_step={cfg.tokens_per_step} over {workers} workers gives "
                        f"{capacity}-token rows, shorter than kd.max_length={cfg.max_length}: "
                        f"raise tokens_per_step to at least {cfg.max_length * workers}")
    student = cfg.student
    template = check_chat_format(student, cfg.chat_template, cfg.prompt_format, "kd", "student")
    tokenizer = AutoTokenizer.from_pretrained(student)
    vocab = AutoConfig.from_pretrained(student).get_text_config().vocab_size
    fmt = target_format(tokenizer, student, template, cfg.prompt_format, cfg.reasoning_tags,
                        "kd.student")
    if cfg.online_teacher:
        check_online_teacher(cfg, tokenizer, ctx.resources)
    source = inputs["distributions"]
    split = "sft" if "sft" in source.splits else None
    table, teacher = teacher_arrays(source, split)
    if not teacher:
        raise UserError(f"kd: {source.ref()} has no rows (no SFT rows with teacher "
                        f"distributions): {upstream_drops(source, ctx.data_root)}")
    missing = [i for i, t in enumerate(teacher) if t is None]
    if missing:
        raise UserError(f"kd: {source.ref()} has no teacher distribution (topk_ids / topk_logps "
                        f"/ completion_ids empty) for {len(missing)} of its {len(teacher)} rows "
                        f"(first: row {missing[0]}); rerun `distillery run distributions`")
    messages = table.column("messages").to_pylist()

    samples, stats = [], {"truncated": 0}
    for i, (conversation, (ids, lps, completion)) in enumerate(zip(messages, teacher)):
        where = f"kd: {source.ref()} row {i}"
        if not conversation or conversation[-1]["role"] != "assistant":
            raise UserError(f"{where}: the last message must be the assistant's answer")
        prompt_ids, ours = encode(tokenizer, conversation[:-1], conversation[-1]["content"], fmt)
        # the teacher's positions are the student's completion tokens, or their first ones
        # when distributions cut the sample at its own max_length
        if not len(ids) == len(lps) == len(completion) or \
                ours[:len(completion)] != completion.tolist():
            raise UserError(f"{where}: its completion_ids ({len(completion)} tokens, "
                            f"{len(ids)} teacher positions) are not kd.student's tokens of the "
                            f"trace ({len(ours)}): distributions used another student, "
                            "chat_template, prompt_format or reasoning_tags than kd")
        if ids.max() >= vocab:
            raise UserError(f"{where}: teacher id {int(ids.max())} is outside kd.student's "
                            f"vocabulary ({vocab} ids)")
        seq, n_prompt, outcome = fit_length(prompt_ids, completion.tolist(), cfg.max_length,
                                            cfg.overlong)
        if seq is None:
            ctx.drops[outcome] += 1
            continue
        stats["truncated"] += outcome == "truncated" or len(completion) < len(ours)
        n = len(seq) - n_prompt
        samples.append((seq, n_prompt, ids[:n], lps[:n]))
    if not samples:
        raise UserError(f"kd: every one of the {len(teacher)} rows was dropped "
                        f"({dict(ctx.drops)}); raise kd.max_length or use kd.overlong=truncate")

    bins = pack([len(s[0]) for s in samples], capacity)
    random.Random(cfg.seed).shuffle(bins)  # longest-first packing order is not a training order
    rows = []
    for b in bins:
        row = packed_row([samples[i][:2] for i in b])
        # packed_row's keep lists each sample's completion positions in sample order
        row["topk_ids"] = np.concatenate([samples[i][2] for i in b])
        row["topk_logps"] = np.concatenate([samples[i][3] for i in b])
        rows.append(row)
    n_tokens = sum(len(s[0]) for s in samples)
    steps_per_epoch = -(-len(rows) // workers)
    total_steps = cfg.max_steps or int(np.ceil(cfg.epochs * steps_per_epoch))
    stats.update(samples=len(samples), packed_rows=len(rows), tokens_per_epoch=n_tokens,
                 completion_tokens_per_epoch=sum(len(s[2]) for s in samples),
                 teacher_k=int(samples[0][2].shape[1]),
                 # fill = real tokens / row capacity: what padding would have wasted instead
                 pack_fill=round(n_tokens / (len(rows) * capacity), 4),
                 steps_per_epoch=steps_per_epoch, divergence=cfg.divergence,
                 kd_ratio=cfg.kd_ratio, online_teacher=cfg.online_teacher)

    config = worker_config(cfg, ctx, student, fmt.end_of_turn)
    config.update(divergence=cfg.divergence, kd_ratio=cfg.kd_ratio, beta=cfg.beta,
                  skew_alpha=cfg.skew_alpha, taid_t_start=cfg.taid_t_start,
                  taid_t_end=cfg.taid_t_end, taid_alpha=cfg.taid_alpha,
                  taid_momentum=cfg.taid_momentum, total_steps=total_steps,
                  online_teacher=cfg.online_teacher, teacher=cfg.teacher,
                  mixup_alpha=cfg.mixup_alpha, mixup_weight=cfg.mixup_weight,
                  student_vocab=vocab,
                  metric_lists=["kd/ce", "kd/divergence"]
                  + (["kd/taid_t"] if cfg.divergence == "taid" else [])
                  + (["kd/mixup"] if cfg.online_teacher else []))
    fit(kd_worker, config, ctx.resources, ctx, rows)
    stats.update(read_stats(ctx))
    stats["zero_stage"] = ctx.resources.zero_stage
    ctx.stats.update(stats)
    return None


STAGE = Stage(
    name="kd",
    config=KdConfig,
    reads=("distributions",),
    requires=("messages",) + TEACHER_COLUMNS,
    adds=(),
    run=run,
    output="model",
    resumable=True,  # the checkpoints of an interrupted run survive for the next try
)
