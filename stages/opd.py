"""Stage `opd` — on-policy distillation: the student samples, the teacher scores the student's
own tokens, the student learns from them (docs/methods.md, "On-policy distillation"; docs/opd.md).

Reads `select` (split `sft`: its problems and the prompts sft trained on), `sft` (the checkpoint
the student starts from; `opd.start=PATH` starts from any other, e.g. a redi one) and `prompts`
(the reference answers the samples are verified against). Writes a Hugging Face checkpoint
folder as its version, like sft.

    distillery run opd --recipe configs/tiny.yaml opd.iterations=4 opd.incorrect=drop

Each iteration i = 0 .. iterations-1, on `prompts_per_iteration` problems (a seeded order of
all problems, taken in turn):
  1. sample: the student of iteration i (the start checkpoint, then iteration i-1's) samples
     `n` completions per prompt on vLLM engines kept up across iterations, each iteration's
     checkpoint loaded into them in place (cluster/inference.py WarmEngines);
  2. verify: each sample's answer against the reference (stages/lib/answers.py) -> `correct`;
  3. score: the teacher and the same student score the sample's tokens after their prompts
     (stages/lib/packed.py score_token_ids) in scoring actors kept up across iterations, the
     teacher loaded once and each iteration's student in place (cluster/scoring.py
     WarmScorers): teacher_logps and the sampling policy's student_logps per completion token;
  4. train: one job on the run's Ray Train worker group, kept up across iterations
     (cluster/train.py TrainGroup; stages/lib/trainer.py train_packed) over the samples with

       loss = sampled_rkl_loss(new, old, teacher, mask)     (stages/lib/divergences.py)
            = -sum_t mask_t exp(new_t - old_t) A_t / sum_t mask_t,  A_t = -(old_t - teacher_t)

     `incorrect` decides what a wrong sample contributes: keep (its tokens stay in the mask),
     drop (masked out), redi (masked out, plus REDI's negative term
     alpha * sum_wrong log pi(y-)/|y-| / samples in the row, which pushes it down).
     loss topk instead: the mean over the mask's positions of a divergence between the
     teacher's top-k + tail (stored by the scorer) and the student's distribution.

With `async` 1, iteration i's steps 1-3 run (with checkpoint i-1) while iteration i-1 trains.

Resume: everything of iteration i lives under <version tmp>/iterations/iter-NNNNN/:
sampled.parquet, then scored.parquet, then model/ (the checkpoint of iteration i+1), then
done.json (its stats) written LAST, the marker. A rerun skips finished iterations and, inside
the unfinished one, the steps whose files exist. When all are done the last model's files are
copied into the version folder, the intermediate checkpoints are deleted and scored.parquet of
every iteration stays (the learning curve's data).
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass

from cluster.inference import Sampling, WarmEngines
from cluster.scoring import WarmScorers, score_batches
from cluster.train import TrainGroup, fit
from pipeline.errors import UserError
from pipeline.resources import scoring_pool
from pipeline.stage import Stage
from stages.lib.answers import VerifyConfig, answer_parts, verify_rows
from stages.lib.chat import (check_chat_format, load_tokenizer, render_prompt, split_think,
                             target_format)
from stages.lib.divergences import divergence as topk_divergence, sampled_rkl_loss
from stages.lib.packed import (ATTENTION, completion_logps, onednn_linears, packed_row,
                               register_attention, score_token_ids)
from stages.lib.topk import teacher_topk
from stages.lib.topk_loss import CHUNK, KdLoss, kd_token_losses
from stages.lib.trainer import refuse_sequence_parallel, train_packed, worker_config

LOSSES = ("sampled_rkl", "topk")
TOPK_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
INCORRECT = ("keep", "drop", "redi")


@dataclass
class OpdConfig:
    """Knobs of the opd stage (engines, scorers, workers: `resources.opd`).

    teacher: the model that scores the student's samples (filled from the recipe's teacher); its
      tokenizer must be the student's (the student's token ids are scored as they are).
    start: the checkpoint the student starts from; "" = the sft version this run reads.
    iterations: sample -> verify -> score -> train rounds.
    prompts_per_iteration: problems sampled per iteration (taken in turn from a seeded order).
    n: completions per problem and iteration (>= 1).
    max_tokens / temperature / top_p: the student's sampling (on-policy: temperature 1).
    max_model_len: the engines' context (0 = the model's).
    loss: "sampled_rkl" (per-token advantage -(log pi_S - log pi_T), importance-sampled policy
      gradient; tinker-cookbook) or "topk" (a divergence between the teacher's top-k + tail
      and the student's distribution at every position of the student's samples; GKD /
      NeMo-RL; stages/lib/divergences.py).
    topk / divergence / beta: loss topk: how many teacher ids per position (NeMo-RL: 64),
      which divergence ("forward_kl", "reverse_kl", "jsd": GKD's, beta = its mixture weight,
      0.5 = NeMo-RL's "mixed").
    incorrect: what verified-wrong samples contribute: "keep" (trained like the others),
      "drop" (their tokens leave the loss), "redi" (they leave the sampled_rkl term and add
      REDI's negative term, weight redi_alpha).
    redi_alpha: REDI's alpha for incorrect=redi.
    async_ (the recipe's `opd.async`): 0 = each iteration samples with the checkpoint the
      previous one trained; 1 = iteration i samples and scores while iteration i-1 trains,
      with the checkpoint before (one iteration stale: slightly off-policy; sampled_rkl's
      importance ratio exp(new - old) corrects the token log-probs for it, the topk loss does
      not need it). Needs the engines, scorers and training workers up at once.
    samples_per_step: samples in one optimizer step, all workers together; each worker packs
      samples_per_step / num_workers samples into one row. Iteration i trains one epoch over
      its samples: ceil(samples / samples_per_step) steps, a fresh optimizer each iteration.
    learning_rate / weight_decay / max_grad_norm: the optimizer (constant LR, no warm-up).
    tokens_per_row: capacity of one packed scoring forward.
    seed: the problem order, the engines' sampling seed (with the iteration) and the trainer's.
    keep_checkpoints: keep every iteration's checkpoint (iterations/iter-NNNNN/model, the
      student after iteration i) in the version, e.g. to evaluate the curve; off: only the last.
    save_steps / logging_steps / report_to: as in sft (save_steps 0: an interrupted fit
      restarts its iteration's training; sampled and scored files are kept either way).
    chat_template / prompt_format / reasoning_tags: as in sft (use the values sft used).
    """

    teacher: str = ""
    start: str = ""
    iterations: int = 2
    prompts_per_iteration: int = 16
    n: int = 4
    max_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    max_model_len: int = 0
    loss: str = "sampled_rkl"
    topk: int = 64
    divergence: str = "reverse_kl"
    beta: float = 0.5
    incorrect: str = "keep"
    redi_alpha: float = 0.8
    async_: int = 0
    samples_per_step: int = 16
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    tokens_per_row: int = 16384
    seed: int = 0
    keep_checkpoints: bool = False
    save_steps: int = 0
    logging_steps: int = 1
    report_to: str = "tensorboard"
    chat_template: str = ""
    prompt_format: str = "chat"
    reasoning_tags: str = "think"


# --- the loss ------------------------------------------------------------------------------------

def token_masks(correct: list, lengths: list[int], incorrect: str):
    """Per completion token of samples laid end to end: (rkl_mask, neg_mask), float32 numpy.

    correct: per sample True / False / None (unverifiable: treated as not wrong). A wrong
    sample's tokens are 0 in rkl_mask under drop and redi, and 1 in neg_mask under redi only.
    """
    import numpy as np

    wrong = np.repeat(np.array([c is False for c in correct], dtype=bool),
                      np.asarray(lengths, dtype=np.int64))
    rkl = np.ones(len(wrong), dtype=np.float32)
    neg = np.zeros(len(wrong), dtype=np.float32)
    if incorrect in ("drop", "redi"):
        rkl[wrong] = 0.0
    if incorrect == "redi":
        neg[wrong] = 1.0
    return rkl, neg


def opd_loss(new_logps, old_logps, teacher_logps, rkl_mask, neg_mask, keep_seq, n_seqs: int,
             alpha: float):
    """sampled_rkl_loss over rkl_mask's tokens, plus (where neg_mask marks wrong samples)

        alpha * sum_{wrong s} (sum_{t in s} new_t) / |s|  /  n_seqs

    REDI's negative term: the mean over the row's samples of a wrong sample's length-normalised
    log-likelihood (0 for the others). All tensors are [K] over the row's completion tokens;
    keep_seq says which sample each token belongs to.
    """
    import torch

    loss = sampled_rkl_loss(new_logps, old_logps, teacher_logps, rkl_mask)
    if bool((neg_mask > 0).any()):
        neg = neg_mask.to(new_logps.dtype)
        sums = torch.zeros(n_seqs, dtype=new_logps.dtype, device=new_logps.device)
        sums = sums.index_add(0, keep_seq, new_logps * neg)
        lengths = torch.bincount(keep_seq, minlength=n_seqs).clamp(min=1).to(new_logps.dtype)
        loss = loss + alpha * (sums / lengths).sum() / n_seqs
    return loss


def row_key(input_ids, cu_seqlens) -> str:
    """Which packed row a batch is: the trainer's collate keeps only the model's inputs, so a
    worker finds the row's recorded log-probs by its tokens (identical rows hold identical
    samples, hence identical recorded values)."""
    import numpy as np

    blob = (np.ascontiguousarray(input_ids, dtype=np.int64).tobytes()
            + np.ascontiguousarray(cu_seqlens, dtype=np.int64).tobytes())
    return hashlib.sha1(blob).hexdigest()


def masked_mean(d, mask):
    """sum_t m_t d_t / sum_t m_t (0 where the mask is empty): the topk loss over its positions."""
    keep = mask.to(d.dtype)
    return (d * keep).sum() / keep.sum().clamp(min=1)


def topk_loss(student_logps, teacher_ids, teacher_logps, mask, divergence: str, beta: float):
    """Mean over mask's positions of divergences.divergence(divergence) between the teacher's
    top-k + tail and the student's full distribution (student_logps [K, V]), a scalar: the
    dense formula (the tests' reference; training takes it chunked, opd_batch_loss)."""

    d = topk_divergence(divergence, student_logps, teacher_ids, teacher_logps, beta=beta)
    return masked_mean(d, mask)


def opd_batch_loss(model, batch, aux: dict, alpha: float, loss: str = "sampled_rkl",
                   divergence: str = "reverse_kl", beta: float = 0.5, chunk: int = CHUNK):
    """One worker's loss on its packed row; `chunk`: LM-head positions at a time (loss topk;
    0 = the full [K, vocab] logits at once, the tests' reference)."""
    import torch

    old, teacher, rkl, neg, *top = (torch.as_tensor(a) for a in aux[row_key(
        batch["input_ids"][0].cpu().numpy(), batch["cu_seqlens"].cpu().numpy())])
    # What the step trains on, for the logs: the sampled reverse-KL estimate of its tokens.
    keep = rkl > 0
    kl = float((old - teacher)[keep].mean()) if bool(keep.any()) else 0.0
    if loss == "topk":
        # kd's chunked head + divergence with kd_ratio 1 (the divergence alone): the student's
        # [K, vocab] logits never exist for the whole row. The token log-probs new = -CE come
        # from the same chunks, for REDI's term.
        device = batch["input_ids"].device
        row = {**batch, "topk_ids": top[0].to(device), "topk_logps": top[1].to(device)}
        d, ce, _ = kd_token_losses(model, row, KdLoss(divergence, 1.0, beta=beta), chunk=chunk)
        new = -ce
        device = new.device
        loss_value = masked_mean(d, rkl.to(device))
        loss_value = loss_value + opd_loss(new, new.detach(), new.detach(),
                                           torch.zeros_like(rkl).to(device), neg.to(device),
                                           batch["keep_seq"].to(device), batch["n_seqs"], alpha)
        return loss_value, {"opd/kl": kl}
    new = completion_logps(model, batch)
    device = new.device
    loss = opd_loss(new, old.to(device), teacher.to(device), rkl.to(device), neg.to(device),
                    batch["keep_seq"].to(device), batch["n_seqs"], alpha)
    return loss, {"opd/kl": kl}


def opd_worker(config: dict) -> None:
    import ray

    aux = {row_key(r["input_ids"], r["cu_seqlens"]): (
        r["old_logps"], r["teacher_logps"], r["rkl_mask"], r["neg_mask"],
        *((r["topk_ids"], r["topk_logps"]) if "topk_ids" in r else ()))
        for r in ray.get(config["rows"])}
    train_packed(config, functools.partial(opd_batch_loss, aux=aux, alpha=config["alpha"],
                                           loss=config["loss"],
                                           divergence=config["divergence"],
                                           beta=config["beta"]))


# --- scoring: one batch of samples in a pool actor -----------------------------------------------

def score_batch(models: dict, batch, tokens_per_row: int, topk: int = 0):
    """teacher_logps and student_logps of every sample's completion tokens (pool actor); with
    topk > 0 also the teacher's top-k ids and log-probs at each of those positions."""
    import pyarrow as pa

    completion = batch.column("completion_ids").to_pylist()
    for name in ("teacher", "student"):
        model, _ = models[name]
        prompts = batch.column(f"{name}_prompt_ids").to_pylist()
        seqs = [(p + c, len(p)) for p, c in zip(prompts, completion)]
        logps = score_token_ids(model, seqs, tokens_per_row)
        batch = batch.append_column(f"{name}_logps", pa.array(logps, pa.list_(pa.float64())))
    if topk > 0:
        ids, logps = teacher_topk_columns(models, batch, completion, topk)
        batch = batch.append_column("topk_ids", pa.array(ids, pa.list_(pa.list_(pa.int32()))))
        batch = batch.append_column("topk_logps",
                                    pa.array(logps, pa.list_(pa.list_(pa.float32()))))
    return batch


def teacher_topk_columns(models: dict, batch, completion: list, k: int):
    """Per sample, the teacher's top-k ([positions][k] ids, log-probs) over the student's ids,
    one packed row per sample (stages/lib/topk.py teacher_topk)."""
    import torch

    model, _ = models["teacher"]
    vocab = models["student"][0].config.vocab_size
    device = next(model.parameters()).device
    ids, logps = [], []
    for p, c in zip(batch.column("teacher_prompt_ids").to_pylist(), completion):
        if not c:
            ids.append([])
            logps.append([])
            continue
        row = packed_row([(p + c, len(p))])
        t = {key: torch.as_tensor(row[key], device=device)
             for key in ("cu_seqlens", "keep", "targets")}
        t["input_ids"] = torch.as_tensor(row["input_ids"], device=device)[None]
        t["position_ids"] = torch.as_tensor(row["position_ids"], device=device)[None]
        t["max_seqlen"] = row["max_seqlen"]
        out = teacher_topk(model, t, min(k, vocab), vocab)
        ids.append(out["ids"].cpu().tolist())
        logps.append(out["logps"].cpu().tolist())
    return ids, logps


# --- the driver ----------------------------------------------------------------------------------

def check_config(cfg: OpdConfig, start: str):
    """Refuse bad settings before Ray starts; returns (student template, teacher template,
    student tokenizer, teacher tokenizer)."""

    if cfg.n < 1:
        raise UserError(f"opd.n: must be >= 1 (completions per problem), got {cfg.n}")
    if cfg.loss not in LOSSES:
        raise UserError(f"opd.loss: '{cfg.loss}' is not one of {list(LOSSES)}")
    if cfg.loss == "topk" and (cfg.divergence not in TOPK_DIVERGENCES or cfg.topk < 1
                               or not 0.0 <= cfg.beta <= 1.0):
        raise UserError(f"opd.divergence / opd.topk / opd.beta: loss topk needs a divergence of "
                        f"{list(TOPK_DIVERGENCES)} (got '{cfg.divergence}'), topk >= 1 (got "
                        f"{cfg.topk}) and beta in [0, 1] (got {cfg.beta})")
    if cfg.incorrect not in INCORRECT:
        raise UserError(f"opd.incorrect: '{cfg.incorrect}' is not one of {list(INCORRECT)}")
    if cfg.iterations < 1 or cfg.prompts_per_iteration < 1 or cfg.max_tokens < 1:
        raise UserError("opd.iterations, opd.prompts_per_iteration and opd.max_tokens must be "
                        f">= 1 (got {cfg.iterations}, {cfg.prompts_per_iteration}, "
                        f"{cfg.max_tokens})")
    if cfg.async_ not in (0, 1):
        raise UserError(f"opd.async: {cfg.async_} (0 = off, 1 = sample while the previous "
                        "iteration trains)")
    if not 0.0 <= cfg.redi_alpha <= 1.0:
        raise UserError(f"opd.redi_alpha: {cfg.redi_alpha} is outside [0, 1]")
    student_t = check_chat_format(start, cfg.chat_template, cfg.prompt_format, "opd", "start")
    teacher_t = check_chat_format(cfg.teacher, cfg.chat_template, cfg.prompt_format, "opd",
                                  "teacher")
    student_tok = load_tokenizer(start, "opd.start")
    teacher_tok = load_tokenizer(cfg.teacher, "opd.teacher")
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise UserError(f"opd: the teacher {cfg.teacher} and the student {start} have different "
                        f"tokenizers ({len(teacher_tok)} vs {len(student_tok)} tokens): the "
                        "teacher scores the student's own token ids, so they must share one")
    return student_t, teacher_t, student_tok, teacher_tok


def problems_of(inputs) -> list[dict]:
    """[{problem_id, prompt_messages, answer}] sorted by problem_id: select's SFT problems with
    the prompt sft trained on (its messages without the assistant turn) and prompts' answer."""
    sft = inputs["select"].read_table("sft", columns=["problem_id", "messages"]).to_pylist()
    answers = dict(zip(*(inputs["prompts"].read_table(columns=["problem_id", "answer"])
                         .column(c).to_pylist() for c in ("problem_id", "answer"))))
    seen = {}
    for row in sft:
        if row["problem_id"] not in seen:
            seen[row["problem_id"]] = {"problem_id": row["problem_id"],
                                       "prompt_messages": [m for m in row["messages"]
                                                           if m["role"] != "assistant"],
                                       "answer": answers.get(row["problem_id"])}
    return [seen[k] for k in sorted(seen)]


def batch_of(problems: list[dict], i: int, size: int, seed: int) -> list[dict]:
    """Iteration i's problems: a seeded order of all of them, `size` at a time, wrapping."""
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    return [problems[order[(i * size + k) % len(order)]] for k in range(size)]


def _write_atomic(table, path: str) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, path + ".tmp")
    os.replace(path + ".tmp", path)


def start_engines(cfg, ctx, model: str, i: int, template: str) -> WarmEngines:
    """The student's vLLM engines, started once on `model` (the start checkpoint, or the last
    finished iteration's after a rerun) and kept up: later iterations load their checkpoint
    into them (WarmEngines.load)."""
    ctx.ensure_ray()
    return WarmEngines(model, sampling=_sampling(cfg, i), n=cfg.n, resources=ctx.resources,
                       ctx=ctx, max_model_len=cfg.max_model_len,
                       render=functools.partial(render_prompt, chat_template=template,
                                                prompt_format=cfg.prompt_format))


def _sampling(cfg, i: int) -> Sampling:
    return Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                    seed=cfg.seed * 1000 + i)


def sample(cfg, engines: WarmEngines, problems: list[dict], i: int, sampled_by: str = ""):
    """n samples per problem from the engines' current weights (engines.model, recorded as
    `sampled_by`, or the given name of it)."""
    import pyarrow as pa

    table = engines.complete([{"problem_id": p["problem_id"],
                               "prompt_messages": p["prompt_messages"]} for p in problems],
                             _sampling(cfg, i))
    table = table.select(["problem_id", "sample_idx", "completion", "completion_tokens",
                          "completion_ids", "finish_reason"])
    table = table.append_column("sampled_by", pa.array([sampled_by or engines.model]
                                                       * table.num_rows, pa.string()))
    return table.sort_by([("problem_id", "ascending"), ("sample_idx", "ascending")])


def stay_up(resources, *pools, gpus: float | None = None) -> bool:
    """Whether the actor pools `pools` (StageResources: the sampling engines, the scoring pool)
    can stay up through the rest of each iteration beside the training workers: CPU actors
    reserve no Ray CPUs while they wait (WarmEngines, WarmScorers); GPU actors keep their GPUs,
    so the cluster (`gpus`, default: Ray's count) must hold them and the workers' at once

        sum over pools of replicas x gpus_per_replica + workers' GPUs <= the cluster's GPUs

    (4 engines x 1 + 2 scorers x 1 + 2 workers = 8 on an 8-GPU node: all stay up); else each
    iteration starts them and stops them after its call."""
    if not any(p.gpus_per_replica for p in pools):
        return True
    if gpus is None:
        import ray

        gpus = ray.cluster_resources().get("GPU", 0)
    workers = resources.num_workers if resources.use_gpu else 0
    return sum(p.replicas * p.gpus_per_replica for p in pools) + workers <= gpus


def verify(cfg, table, answers: dict):
    import pyarrow as pa

    finals = [split_think(c or "", cfg.reasoning_tags)[1]
              for c in table.column("completion").to_pylist()]
    cols = verify_rows(finals, [answers[p] for p in table.column("problem_id").to_pylist()],
                       VerifyConfig(),
                       parts=answer_parts(None, table.column("finish_reason").to_pylist()))
    table = table.append_column("pred_answer", pa.array(cols["pred_answer"], pa.string()))
    return table.append_column("correct", pa.array(cols["correct"], pa.bool_()))


def prompt_ids(cfg, table, messages: dict, toks: dict, templates: dict):
    """Each model's prompt ids of every sample, rendered as the engine rendered the student's
    (columns student_prompt_ids / teacher_prompt_ids for score_batch). The completion ids are
    the engine's own sampled ids (`completion_ids`, its stop token included): the scorers and
    the trainer see exactly the tokens the student drew."""
    import pyarrow as pa

    ids = {name: {pid: toks[name](render_prompt(toks[name], m, templates[name],
                                                cfg.prompt_format),
                                  add_special_tokens=False)["input_ids"]
                  for pid, m in messages.items()} for name in ("student", "teacher")}
    pids = table.column("problem_id").to_pylist()
    for name in ("student", "teacher"):
        table = table.append_column(f"{name}_prompt_ids",
                                    pa.array([ids[name][p] for p in pids], pa.list_(pa.int64())))
    return table


def _score_fn(cfg):
    return functools.partial(score_batch, tokens_per_row=cfg.tokens_per_row,
                             topk=cfg.topk if cfg.loss == "topk" else 0)


def start_scorers(cfg, ctx, student: str) -> WarmScorers:
    """The teacher and `student` loaded once in the scoring actors, kept up for the run; each
    later iteration loads only its student checkpoint into them (WarmScorers.load)."""
    return WarmScorers({"teacher": cfg.teacher, "student": student}, score_fn=_score_fn(cfg),
                       resources=scoring_pool(ctx.resources), ctx=ctx, prepare=register_attention,
                       cpu_model_hook=onednn_linears, attn_implementation=ATTENTION)


def score(cfg, ctx, table, student: str, scorers: WarmScorers | None):
    """teacher_logps / student_logps (and the teacher's top-k) of every sample: on the warm
    scorers when the run keeps them, else on a scoring pool started for this call."""
    import pyarrow as pa
    import ray.data

    if scorers is not None:
        scorers.load("student", student)
        out = scorers.score(table)
    else:
        pool = scoring_pool(ctx.resources)
        scored = score_batches(ray.data.from_arrow(table),
                               models={"teacher": cfg.teacher, "student": student},
                               score_fn=_score_fn(cfg), resources=pool, ctx=ctx,
                               batch_size=max(1, -(-table.num_rows // pool.replicas)),
                               prepare=register_attention, cpu_model_hook=onednn_linears,
                               attn_implementation=ATTENTION)
        out = pa.Table.from_pylist(scored.take_all())
    return out.sort_by([("problem_id", "ascending"), ("sample_idx", "ascending")])


def train(cfg, ctx, table, student: str, out_dir: str, i: int, end_of_turn: str,
          trainers: TrainGroup | None) -> tuple[dict, float]:
    """Iteration i's training from `student` into out_dir: (train_stats.json, the seconds the
    job waited for the training workers: the kept-up group's start, else 0)."""
    import numpy as np

    workers = ctx.resources.num_workers
    per_worker = max(1, cfg.samples_per_step // workers)
    samples = [r for r in table.to_pylist() if r["completion_ids"]]
    if not samples:
        raise UserError(f"opd: iteration {i}: no sample has a completion token (finish reasons "
                        f"{sorted(set(table.column('finish_reason').to_pylist()))}); raise "
                        "opd.max_model_len or opd.max_tokens")
    random.Random(cfg.seed * 1000 + i).shuffle(samples)
    rows = []
    for k in range(0, len(samples), per_worker):
        group = samples[k:k + per_worker]
        row = packed_row([(s["student_prompt_ids"] + s["completion_ids"],
                           len(s["student_prompt_ids"])) for s in group])
        rkl, neg = token_masks([s["correct"] for s in group],
                               [len(s["completion_ids"]) for s in group], cfg.incorrect)
        row.update(old_logps=np.concatenate([s["student_logps"] for s in group]),
                   teacher_logps=np.concatenate([s["teacher_logps"] for s in group]),
                   rkl_mask=rkl, neg_mask=neg)
        if cfg.loss == "topk":
            row.update(topk_ids=np.concatenate([np.asarray(s["topk_ids"], dtype=np.int64)
                                                for s in group]),
                       topk_logps=np.concatenate([np.asarray(s["topk_logps"],
                                                             dtype=np.float32)
                                                  for s in group]))
        rows.append(row)
    schedule = dict(epochs=1.0, max_steps=0, warmup_ratio=0.0, lr_scheduler="constant")
    config = worker_config(_Knobs(cfg, seed=cfg.seed * 1000 + i, **schedule), ctx, student,
                           end_of_turn)
    config.update(out_dir=out_dir, alpha=cfg.redi_alpha, metric_lists=["opd/kl"],
                  loss=cfg.loss, divergence=cfg.divergence, beta=cfg.beta)
    waited = 0.0
    if trainers is not None:
        waited = trainers.run(config, rows)
    else:
        fit(opd_worker, config, ctx.resources, ctx, rows)
    with open(os.path.join(out_dir, "train_stats.json"), encoding="utf-8") as f:
        return json.load(f), waited


class _Knobs:
    """cfg with the per-iteration schedule fields worker_config reads."""

    def __init__(self, cfg, **extra):
        self.__dict__.update(vars(cfg))
        self.__dict__.update(extra)


def iteration_stats(table, timings: dict, train_stats: dict) -> dict:
    correct = table.column("correct").to_pylist()
    tokens = table.column("completion_tokens").to_pylist()
    gap = [s - t for ss, ts in zip(table.column("student_logps").to_pylist(),
                                   table.column("teacher_logps").to_pylist())
           for s, t in zip(ss, ts)]
    return {
        "samples": table.num_rows,
        "pass_rate": round(sum(c is True for c in correct) / len(correct), 4) if correct else None,
        "incorrect": sum(c is False for c in correct),
        "mean_tokens": round(sum(tokens) / len(tokens), 2) if tokens else None,
        # E_{y ~ student}[log pi_S(y_t) - log pi_T(y_t)] per token: the sampled reverse KL
        "kl": round(sum(gap) / len(gap), 5) if gap else None,
        "loss": train_stats.get("mean_loss"),
        "steps": train_stats.get("steps"),
        "tokens_seen": train_stats.get("tokens_seen"),  # prompt + completion, as sft / redi
        "seconds": {k: round(v, 2) for k, v in timings.items()},
    }


def run(cfg: OpdConfig, inputs, ctx):
    import pyarrow.parquet as pq

    refuse_sequence_parallel(ctx, "each sample's recorded log-probs beside its tokens")
    start = cfg.start or (inputs["sft"].path if "sft" in inputs else "")
    if not start:
        raise UserError("opd: no student checkpoint to start from: run sft first "
                        "(`distillery run sft`) or set opd.start=PATH")
    student_t, teacher_t, student_tok, teacher_tok = check_config(cfg, start)
    fmt = target_format(student_tok, start, student_t, cfg.prompt_format, cfg.reasoning_tags,
                        "opd.start")
    problems = problems_of(inputs)
    if not problems:
        raise UserError(f"opd: {inputs['select'].ref()} has no problems in its split 'sft'")
    missing = [p["problem_id"] for p in problems if p["answer"] in (None, "")]
    if len(missing) == len(problems):
        raise UserError(f"opd: none of the {len(problems)} problems has an answer in "
                        f"{inputs['prompts'].ref()}: the samples cannot be verified")
    answers = {p["problem_id"]: p["answer"] for p in problems}

    root = os.path.join(ctx.out_dir, "iterations")
    os.makedirs(root, exist_ok=True)
    lag = cfg.async_
    if lag:
        ctx.ensure_ray()
        if not stay_up(ctx.resources, ctx.resources, scoring_pool(ctx.resources)):
            raise UserError(
                f"opd.async: {lag} overlaps sampling and scoring with training, so the engines, "
                f"the scorers and the training workers must fit the cluster at once "
                f"(resources.opd: the engines, resources.opd.scorers and num_workers); use "
                f"opd.async=0 or smaller pools")
    # Iteration i trains from checkpoint(i) into iteration i's model/ = checkpoint(i + 1); it
    # samples with checkpoint(i - lag): with async 1 the samples of i are drawn while i - 1
    # still trains, by the checkpoint before (their old log-probs are that policy's, so the
    # importance ratio exp(new - old) corrects for the one iteration of staleness).
    def checkpoint(j: int) -> str:
        return start if j <= 0 else os.path.join(root, f"iter-{j - 1:05d}", "model")

    def recorded(path: str) -> str:
        """A checkpoint as the version records it: inside the version relative to its folder
        (the temporary folder the run writes is renamed when it completes)."""
        inside = path.startswith(ctx.out_dir + os.sep)
        return os.path.relpath(path, ctx.out_dir) if inside else path

    history, engines, scorers, trainers, pending = [], None, None, None, None
    clock = time.monotonic()
    background = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def finish(job) -> None:
        """Wait for a training job; write its iteration's marker, LAST."""
        i, future, table, timings, timeline = job
        t0 = time.monotonic()
        (train_stats, waited), began, ended = future.result()
        timeline["train"] = [round(began - clock, 2), round(ended - clock, 2)]
        timings["trainer_start"] = waited
        timings["train"] = ended - began - waited
        stats = {"iteration": i, "student": recorded(checkpoint(i)),
                 **iteration_stats(table, timings, train_stats), "timeline": timeline}
        if lag:
            stats["waited_for_training"] = round(time.monotonic() - t0, 2)
        done = os.path.join(root, f"iter-{i:05d}", "done.json")
        with open(done + ".tmp", "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=1)
        os.replace(done + ".tmp", done)  # the marker: iteration i is complete
        print(f"opd: iteration {i}: pass rate {stats['pass_rate']}, mean tokens "
              f"{stats['mean_tokens']}, kl {stats['kl']}, loss {stats['loss']}; seconds "
              + ", ".join(f"{k} {v}" for k, v in stats["seconds"].items()), flush=True)
        log_curve(cfg, ctx, stats)
        history.append(stats)

    try:
        for i in range(cfg.iterations):
            folder = os.path.join(root, f"iter-{i:05d}")
            done = os.path.join(folder, "done.json")
            if os.path.exists(done):
                with open(done, encoding="utf-8") as f:
                    history.append(json.load(f))
                continue
            if pending is not None and not lag:
                finish(pending)  # synchronous: iteration i samples the checkpoint i - 1 wrote
                pending = None
            os.makedirs(folder, exist_ok=True)
            policy = checkpoint(i - lag)
            timings = {"engine_start": 0.0, "weight_sync": 0.0, "sample": 0.0, "verify": 0.0,
                       "scorer_start": 0.0, "score": 0.0, "trainer_start": 0.0, "train": 0.0}
            timeline = {}  # step -> [start, end], seconds since the run began
            batch = batch_of(problems, i, cfg.prompts_per_iteration, cfg.seed)
            sampled_path = os.path.join(folder, "sampled.parquet")
            scored_path = os.path.join(folder, "scored.parquet")
            if not os.path.exists(scored_path):
                if os.path.exists(sampled_path):
                    table = pq.read_table(sampled_path)
                else:
                    # One set of engines for the whole run: started on the first iteration this
                    # run samples, then each iteration's policy loaded into them (weight_sync).
                    t0 = time.monotonic()
                    if engines is None:
                        engines = start_engines(cfg, ctx, policy, i, student_t)
                        timings["engine_start"] = time.monotonic() - t0
                    else:
                        engines.load(policy)
                        timings["weight_sync"] = time.monotonic() - t0
                    t0 = time.monotonic()
                    table = sample(cfg, engines, batch, i, recorded(policy))
                    timings["sample"] = time.monotonic() - t0
                    timeline["sample"] = [round(t0 - clock, 2),
                                          round(time.monotonic() - clock, 2)]
                    if i == cfg.iterations - 1 or not stay_up(ctx.resources, ctx.resources):
                        engines.close()  # their memory (and GPUs) go to scoring and training
                        engines = None
                    t0 = time.monotonic()
                    table = verify(cfg, table, answers)
                    timings["verify"] = time.monotonic() - t0
                    _write_atomic(table, sampled_path)
                # The scorers, like the engines, start once (the first iteration this run
                # scores) and then load each iteration's policy; the teacher stays loaded.
                if scorers is None and stay_up(ctx.resources, scoring_pool(ctx.resources),
                                               *([ctx.resources] if engines else [])):
                    t0 = time.monotonic()
                    scorers = start_scorers(cfg, ctx, policy)
                    timings["scorer_start"] = time.monotonic() - t0
                t0 = time.monotonic()
                messages = {p["problem_id"]: p["prompt_messages"] for p in batch}
                table = prompt_ids(cfg, table, messages,
                                   {"student": student_tok, "teacher": teacher_tok},
                                   {"student": student_t, "teacher": teacher_t})
                table = score(cfg, ctx, table, policy, scorers)
                table = table.append_column("scored_by",
                                            _constant(recorded(policy), table.num_rows))
                timings["score"] = time.monotonic() - t0
                timeline["score"] = [round(t0 - clock, 2), round(time.monotonic() - clock, 2)]
                _write_atomic(table, scored_path)
            table = pq.read_table(scored_path)
            if pending is not None:
                finish(pending)  # async: checkpoint(i) is iteration i - 1's training
                pending = None
            if trainers is None and stay_up(ctx.resources, ctx.resources,
                                            scoring_pool(ctx.resources)):
                trainers = TrainGroup(opd_worker, ctx.resources, ctx)
            future = background.submit(_timed, train, cfg, ctx, table, checkpoint(i),
                                       os.path.join(folder, "model"), i, fmt.end_of_turn,
                                       trainers)
            pending = (i, future, table, timings, timeline)
        if pending is not None:
            finish(pending)
            pending = None
    finally:
        if pending is not None:
            # a failure while a training job ran: let it end; its iteration gets no marker, so
            # a rerun trains it again from its scored samples
            concurrent.futures.wait([pending[1]])
        background.shutdown(wait=True)
        if engines is not None:
            engines.close()
        if scorers is not None:
            scorers.close()
        if trainers is not None:
            trainers.close()

    student = checkpoint(cfg.iterations)
    # The version is the last iteration's checkpoint; intermediate checkpoints go (unless kept).
    for name in os.listdir(student):
        if os.path.isfile(os.path.join(student, name)):
            shutil.copy(os.path.join(student, name), os.path.join(ctx.out_dir, name))
    for i in range(cfg.iterations):
        folder = os.path.join(root, f"iter-{i:05d}")
        if not cfg.keep_checkpoints:
            shutil.rmtree(os.path.join(folder, "model"), ignore_errors=True)
        if os.path.exists(os.path.join(folder, "sampled.parquet")):
            os.remove(os.path.join(folder, "sampled.parquet"))
    ctx.stats.update({
        "start": inputs["sft"].ref() if not cfg.start and "sft" in inputs else start,
        "iterations": history,
        "pass_rate": [h["pass_rate"] for h in history],
        "mean_tokens": [h["mean_tokens"] for h in history],
        "kl": [h["kl"] for h in history],
        "loss": [h["loss"] for h in history],
        "problems": len(problems),
        "problems_without_answer": len(missing),
        "zero_stage": ctx.resources.zero_stage,
        "pools": {"engines": ctx.resources.replicas,
                  "scorers": scoring_pool(ctx.resources).replicas,
                  "workers": ctx.resources.num_workers},
    })
    return None


CURVE = ("pass_rate", "mean_tokens", "kl", "loss")


def log_curve(cfg, ctx, stats: dict) -> None:
    """The iteration's point of the learning curve in TensorBoard (report_to tensorboard):
    opd/pass_rate, opd/mean_tokens, opd/kl, opd/loss at step = the iteration, under
    <version>/logs/iterations (the trainer's per-step logs are in each iteration's model/)."""
    if cfg.report_to != "tensorboard":
        return
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(os.path.join(ctx.out_dir, "logs", "iterations")) as writer:
        for key in CURVE:
            if stats.get(key) is not None:
                writer.add_scalar(f"opd/{key}", stats[key], stats["iteration"])


def _timed(fn, *args):
    """(fn(*args), its start, its end) on time.monotonic's clock."""
    began = time.monotonic()
    out = fn(*args)
    return out, began, time.monotonic()


def _constant(value: str, n: int):
    import pyarrow as pa

    return pa.array([value] * n, pa.string())


STAGE = Stage(
    name="opd",
    config=OpdConfig,
    reads=("select", "sft", "prompts"),
    requires=("problem_id", "messages"),
    adds=(),
    run=run,
    output="model",
    resumable=True,  # finished iterations (samples, scores, checkpoints) survive a crash
    # opd.start=PATH needs no sft version
    uses=lambda cfg: {"select", "prompts"} | (set() if cfg.start else {"sft"}),
)
