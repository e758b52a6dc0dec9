"""`distillery demo --ablations` — the method comparisons on the demo's task, over fixed seeds.

One teacher, one student, one generated + verified set (the demo's, pipeline/apps/demo.py); then, per
seed, every arm below through the real stages (pipeline.runner.run_stage, each arm its own
versions, chained by pins), and ONE evaluate per seed holding every model of that seed, on the
same held-out problems:

  SFT data arms (each SFT from the base student, same SFT settings):
    random       one random correct trace per problem — the unpruned baseline of DAP and the
                 random baseline of provenance (the same thing: select's seeded shuffle)
    dap_budget   DAP budget mode: the shortest correct trace within its level's budget
    dap_rewrite  DAP rewrite mode: the teacher judges + rewrites every correct trace
                 (configs/dap-demo), re-verified; one random trace per problem of the result
    provenance   the paper's rule: per problem the correct trace with the most teacher sentences
    all          every correct trace (larger: the "how much does selection cost" reference)
  pair arms (each from the `all` SFT model, on its select version's REDI pairs, same steps):
    redi         REDI, alpha 0.2 (chosen by pipeline/apps/sweeps.py on a tuning seed)
    dpo          TRL DPOTrainer (sigmoid, frozen reference)
    simpo        TRL CPOTrainer, loss_type simpo
    sft_cont     REDI's loss with alpha 0: the chosen traces only, the same steps and LR — the
                 fair control for "more training"
  on-policy arm (from the same `all` SFT model, about the pair arms' budget of sequences and
  steps; docs/opd.md):
    opd          on-policy distillation: the student samples, the demo's teacher scores the
                 student's own tokens (sampled reverse KL), OPD_LR (swept)
  logit-distillation arms (each from the base student, on the `all` arm's select: the teacher's
  top-k captured once by `distributions` (the same traces at every seed), then `kd` with sft's
  schedule, so the same traces and the same steps as the `all` SFT model; docs/kd.md):
    kd           forward KL on the stored top-k, kd_ratio KD_RATIO (swept)
    taid         TAID (the interpolated target, t adapted per step)
    mixkd        forward KL + MixKD's mixup term (the teacher online in each training worker)

Seeds vary select's shuffle, SFT / REDI init and data order, and evaluate's sampling; the data the
arms choose from is the same. SEEDS is fixed here, before any run. Printed: per arm the mean and
the sample standard deviation over seeds, and the paired differences the targets are about;
written to <data_root>/ablations.json (the report's "Ablations" section reads it).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

from pipeline.apps import demo
from pipeline.apps.report import mean_sd_text
from pipeline.errors import UserError
from pipeline.runner import run_stage

SEEDS = (0, 1, 2)

# Overrides per arm, on top of the demo's (pipeline/apps/demo.py DEMO_OVERRIDES). "Unpruned" is prune's
# budget mode with budgets no trace reaches and no per-problem cap: every row passes.
UNPRUNED = ["prune.mode=budget", "prune.budgets={easy: 100000, medium: 100000, hard: 100000}",
            "prune.keep_per_problem=0"]
NO_PROVENANCE = ["provenance.method=none"]
SFT_ARMS = {
    "random": UNPRUNED + NO_PROVENANCE + ["select.sft_per_problem=1"],
    "dap_budget": ["prune.mode=budget", "prune.keep_per_problem=1"] + NO_PROVENANCE
                  + ["select.sft_per_problem=1"],
    "dap_rewrite": ["prune.mode=rewrite", "prune.on_reject=keep"] + NO_PROVENANCE
                   + ["select.sft_per_problem=1"],
    "provenance": UNPRUNED + ["provenance.method=score", "provenance.rule=paper",
                              "provenance.keep_per_problem=1", "select.sft_per_problem=1"],
    "all": UNPRUNED + NO_PROVENANCE + ["select.sft_per_problem=0"],
}
PAIR_START = "all"
PAIR_ARMS = {
    # alpha (and every pair arm's LR, the demo's redi.learning_rate) from pipeline/apps/sweeps.py
    "redi": ["redi.loss=redi", "redi.alpha=0.2"],
    "dpo": ["redi.loss=dpo"],
    "simpo": ["redi.loss=simpo"],
    "sft_cont": ["redi.loss=redi", "redi.alpha=0.0"],
}
KD_START = "all"
# kd_ratio of every KD arm: pipeline/apps/sweeps.py kd's pick (tuning seed, validation
# problems); its table and the arms' results at 0.5 and at this ratio are in docs/demo.md.
KD_RATIO = 1.0
KD_ARMS = {
    "kd": ["kd.divergence=forward_kl", f"kd.kd_ratio={KD_RATIO}"],
    "taid": ["kd.divergence=taid", f"kd.kd_ratio={KD_RATIO}"],
    "mixkd": ["kd.divergence=forward_kl", f"kd.kd_ratio={KD_RATIO}", "kd.online_teacher=true"],
}
OPD_START = "all"
# opd's learning rate: pipeline/apps/sweeps.py opd's pick (tuning seed, validation problems;
# docs/demo.md).
OPD_LR = 3e-5
# The pair arms train 163 steps of 8 pairs = 16 sequences (2,608 sequences); opd: 10 iterations
# x 64 problems x 4 samples = 2,560 of the student's own samples, 16 a step (160 steps), at
# on-policy temperature 1. Both arms' trained tokens are in the table (`tokens`).
OPD_ARMS = {
    "opd": ["opd.iterations=10", "opd.prompts_per_iteration=64", "opd.n=4",
            "opd.max_tokens=128", "opd.samples_per_step=16",
            f"opd.learning_rate={OPD_LR:.8f}", "opd.report_to=none",
            # as redi: 2 training workers; the engine in float32 (this CPU emulates bf16)
            "resources.opd.num_workers=2", "resources.opd.enforce_eager=true",
            "resources.opd.dtype=float32"],
}
# kd's settings that sft also has: the KD arms take sft's (same_as_sft), so they train on the
# same tokens for the same steps; distributions takes the text settings kd's arrays align to.
SCHEDULE = ("epochs", "max_steps", "learning_rate", "warmup_ratio", "lr_scheduler",
            "weight_decay", "max_grad_norm", "tokens_per_step", "save_steps")
TEXT = ("max_length", "overlong", "chat_template", "prompt_format", "reasoning_tags")
# The comparisons the issue sets targets for: (name, arm, baseline).
COMPARISONS = (
    ("DAP budget vs unpruned", "dap_budget", "random"),
    ("DAP rewrite vs unpruned", "dap_rewrite", "random"),
    ("provenance vs random (same size)", "provenance", "random"),
    ("REDI vs SFT continued", "redi", "sft_cont"),
    ("REDI vs DPO", "redi", "dpo"),
    ("REDI vs SimPO", "redi", "simpo"),
    ("KD vs SFT (same traces, steps)", "kd", KD_START),
    ("TAID vs forward KL", "taid", "kd"),
    ("MixKD vs forward KL", "mixkd", "kd"),
    ("OPD vs SFT continued", "opd", "sft_cont"),
    ("OPD vs REDI", "opd", "redi"),
)
# The pass@1 targets of the issues: ("arm:baseline", name, the least mean paired difference).
PASS_AT_1_TARGETS = (
    ("redi:sft_cont", "REDI - SFT continued", 0.01),
    ("redi:dpo", "REDI - DPO", 0.0),
    ("provenance:random", "provenance - random", 0.0),
    (f"kd:{KD_START}", "KD - SFT", 0.03),
    ("opd:sft_cont", "OPD - SFT continued", 0.03),
    ("opd:redi", "OPD - REDI", 0.0),
)
METRICS = ("pass_at_1", "pass_at_k", "mean_completion_tokens", "sft_rows", "mean_sft_tokens",
           "tokens")


@dataclass
class AblationPlan:
    """What one ablations run does (the defaults are the full run; tests shrink them).

    seeds: the seeds, fixed before any run.
    extra: overrides applied after the demo's and before the user's. The full run: SFT 2
      epochs (vs the demo's 3), to fit 10 SFT/pair models x 3 seeds in an hour on 2 cores;
      tests: tiny counts.
    teacher: the demo's teacher settings (pipeline/apps/demo.py TEACHER) or smaller ones.
    arms: which arms run (`--arms`; empty = every arm of SFT_ARMS, PAIR_ARMS, KD_ARMS and
      OPD_ARMS). A pair arm brings its start (PAIR_START's SFT arm) along, a KD arm KD_START's,
      the OPD arm OPD_START's; no KD arm skips distributions and kd.
    """

    seeds: tuple = SEEDS
    extra: list = field(default_factory=lambda: ["sft.epochs=2"])
    teacher: dict | None = None
    arms: tuple = ()


def arms_to_run(wanted: tuple) -> tuple[list, list, list, list]:
    """(SFT arms, pair arms, KD arms, OPD arms) in their tables' order for the requested arm
    names."""
    every = {**SFT_ARMS, **PAIR_ARMS, **KD_ARMS, **OPD_ARMS}
    unknown = [a for a in wanted if a not in every]
    if unknown:
        raise UserError(f"--arms: unknown arm(s) {', '.join(unknown)} (the arms: "
                        f"{', '.join(every)})")
    wanted = set(wanted or every)
    pairs = [a for a in PAIR_ARMS if a in wanted]
    kds = [a for a in KD_ARMS if a in wanted]
    opds = [a for a in OPD_ARMS if a in wanted]
    if pairs:
        wanted.add(PAIR_START)
    if kds:
        wanted.add(KD_START)
    if opds:
        wanted.add(OPD_START)
    return [a for a in SFT_ARMS if a in wanted], pairs, kds, opds


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation); sd is None for fewer than two values."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(runs: dict[int, dict[str, dict]]) -> dict:
    """runs {seed: {arm: {metric: value}}} -> {"arms": {arm: {metric: [mean, sd]}},
    "comparisons": [{name, arm, baseline, metric: [mean diff, sd of the paired diffs],
    "per_seed": {metric: [diffs]}}]}; a paired difference uses only seeds that have both."""
    arms = list(dict.fromkeys(a for per_seed in runs.values() for a in per_seed))
    table = {}
    for arm in arms:
        table[arm] = {m: list(mean_sd([runs[s][arm].get(m) for s in runs if arm in runs[s]]))
                      for m in METRICS}
        table[arm]["seeds"] = sum(arm in runs[s] for s in runs)
    comparisons = []
    for name, arm, base in COMPARISONS:
        seeds = [s for s in runs if arm in runs[s] and base in runs[s]]
        if not seeds:
            continue
        row = {"name": name, "arm": arm, "baseline": base, "per_seed": {}}
        for m in ("pass_at_1", "pass_at_k", "mean_completion_tokens", "mean_sft_tokens"):
            diffs = [runs[s][arm][m] - runs[s][base][m] for s in seeds
                     if runs[s][arm].get(m) is not None and runs[s][base].get(m) is not None]
            row[m] = list(mean_sd(diffs))
            row["per_seed"][m] = [round(d, 4) for d in diffs]
        comparisons.append(row)
    return {"arms": table, "comparisons": comparisons}


def format_summary(summary: dict, k: int) -> str:
    """The printed tables: per arm mean ± sd over seeds, then the paired differences."""
    cell = mean_sd_text
    head = (f"{'arm':<12} {'pass@1':>15} {f'pass@{k}':>15} {'own tokens':>13} "
            f"{'SFT rows':>9} {'SFT tokens':>11} {'seeds':>5}")
    lines = [head, "-" * len(head)]
    for arm, row in summary["arms"].items():
        lines.append(f"{arm:<12} {cell(row['pass_at_1']):>15} {cell(row['pass_at_k']):>15} "
                     f"{cell(row['mean_completion_tokens'], 1):>13} "
                     f"{cell(row['sft_rows'], 0):>9} {cell(row['mean_sft_tokens'], 1):>11} "
                     f"{row['seeds']:>5}")
    lines += ["", f"{'paired difference (arm - baseline)':<36} {'pass@1':>15} {f'pass@{k}':>15} "
              f"{'own tokens':>13} {'SFT tokens':>11}"]
    for c in summary["comparisons"]:
        lines.append(f"{c['name']:<36} {cell(c['pass_at_1']):>15} {cell(c['pass_at_k']):>15} "
                     f"{cell(c['mean_completion_tokens'], 1):>13} "
                     f"{cell(c['mean_sft_tokens'], 1):>11}")
    return "\n".join(lines)


def targets(summary: dict) -> list[str]:
    """The issue's targets, each stated as met or missed from the measured means."""
    by = {c["arm"] + ":" + c["baseline"]: c for c in summary["comparisons"]}
    arms = summary["arms"]
    out = []

    def line(ok: bool, text: str) -> None:
        out.append(f"[{'met' if ok else 'MISSED'}] {text}")

    for arm in ("dap_budget", "dap_rewrite"):
        c, base = by.get(f"{arm}:random"), arms.get("random")
        if c and base and base["mean_sft_tokens"][0]:
            cut = -c["mean_sft_tokens"][0] / base["mean_sft_tokens"][0]
            d1, dtok = c["pass_at_1"][0], c["mean_completion_tokens"][0]
            line(cut >= 0.30 and d1 >= -0.01 and dtok < 0,
                 f"{arm}: SFT-trace tokens {-cut:+.0%} (target <= -30%), pass@1 {d1:+.3f} vs "
                 f"unpruned (target >= -0.010), student's own tokens {dtok:+.1f} (target < 0)")
    for key, name, target in PASS_AT_1_TARGETS:
        c = by.get(key)
        if c:
            want = f"{target:+.3f}" if target else "0"
            line(c["pass_at_1"][0] >= target,
                 f"{name}: pass@1 {mean_sd_text(c['pass_at_1'])} (target >= {want})")
    return out


def _overall(summary_rows: list[dict], name: str) -> dict:
    row = next(r for r in summary_rows if r["model"] == name and r["difficulty"] == "all")
    return {m: row[m] for m in ("pass_at_1", "pass_at_k", "mean_completion_tokens")}


def write_result(data_root: str, plan: AblationPlan, runs: dict, evaluations: dict, k: int,
                 started: float, info: dict) -> dict:
    """<data_root>/ablations.json (renamed into place): the per-seed numbers, the summary, the
    targets; complete when every seed of the plan is in."""
    summary = summarize(runs)
    out = os.path.join(data_root, "ablations.json")
    result = {"seeds": list(runs), "planned_seeds": list(plan.seeds),
              "complete": len(runs) == len(plan.seeds), "extra": list(plan.extra),
              "runs": runs, "summary": summary, "targets": targets(summary),
              "evaluations": evaluations, "k": k, "wall_s": round(time.time() - started, 1),
              "teacher_training": {kk: info.get(kk) for kk in ("wall_s", "tokens_per_s")},
              "finished_at": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "path": out}
    with open(out + ".tmp", "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(out + ".tmp", out)
    return result


def shared_setup(recipe_path: str, items: list[str], plan: AblationPlan, last: tuple = ()):
    """The demo's teacher and student (cached), and prompts -> generate -> verify once:
    (recipe_for, shared recipe, prompts, verify, teacher training info). recipe_for(*overrides)
    = the demo's overrides + plan.extra + overrides + `last` + the models + the user's items.
    Also pipeline/apps/sweeps.py's start."""
    items = list(items)
    base = demo.DEMO_OVERRIDES + plan.extra
    _, teacher, student, info = demo.prepare(recipe_path, base, items,
                                             plan.teacher or demo.TEACHER)
    models = [f"teacher={teacher}", f"student={student}"]

    def recipe_for(*overrides):
        return demo.load(recipe_path, base + list(overrides) + list(last) + models + items)

    shared = recipe_for()
    prompts = run_stage("prompts", shared)
    generate = run_stage("generate", shared, {"prompts": prompts.version})
    verify = run_stage("verify", shared, {"generate": generate.version})
    return recipe_for, shared, prompts, verify, info


def sft_arm(recipe, verify):
    """One SFT data arm: prune -> provenance -> select -> sft from verify; (select, sft)."""
    prune = run_stage("prune", recipe, {"verify": verify.version})
    prov = run_stage("provenance", recipe, {"prune": prune.version})
    select = run_stage("select", recipe, {"provenance": prov.version})
    return select, run_stage("sft", recipe, {"select": select.version})


def opd_arm(recipe, select, sft, prompts):
    """The OPD arm: opd from an SFT arm's model, on its select's problems, verified against
    prompts' answers (also pipeline/apps/sweeps.py opd's run)."""
    return run_stage("opd", recipe, {"select": select.version, "sft": sft.version,
                                     "prompts": prompts.version})


def _value(v) -> str:
    """An override's value as the recipe parser reads it back (strings JSON-quoted)."""
    return json.dumps(v) if isinstance(v, str) else str(v)


def same_as_sft(recipe) -> list[str]:
    """Overrides giving kd sft's schedule and text settings and distributions sft's text
    settings, where they differ (equal settings: nothing, so the versions stay the same)."""
    sft, kd, dist = (recipe.configs[s] for s in ("sft", "kd", "distributions"))
    out = [f"kd.{key}={_value(getattr(sft, key))}" for key in SCHEDULE + TEXT
           if getattr(kd, key) != getattr(sft, key)]
    return out + [f"distributions.{key}={_value(getattr(sft, key))}" for key in TEXT
                  if getattr(dist, key) != getattr(sft, key)]


def kd_arms(recipe_for, arms, seeded, start, capture=None) -> tuple:
    """(distributions version, {arm: kd version}) for one seed: distributions on the start
    arm's select (or `capture`, an earlier seed's), then each KD arm (no arms: nothing runs).

    The start arm keeps every correct trace (select.sft_per_problem=0), so its SFT split holds
    the same traces at every seed, only shuffled, and distributions sorts its rows by (problem,
    trace): one capture serves every seed (its version records the first seed's select)."""
    if not arms:
        return capture, {}
    base = recipe_for(*SFT_ARMS[KD_START], *seeded)
    like_sft = same_as_sft(base)
    if capture is None or base.configs["select"].sft_per_problem != 0:
        capture = run_stage("distributions",
                            recipe_for(*SFT_ARMS[KD_START], *seeded, *like_sft),
                            {"select": start["select"].version})
    return capture, {arm: run_stage("kd", recipe_for(*SFT_ARMS[KD_START], *seeded, *like_sft,
                                                     *KD_ARMS[arm]),
                                    {"distributions": capture.version})
                     for arm in arms}


def main(args, plan: AblationPlan | None = None) -> int:
    plan = plan or AblationPlan(arms=tuple(getattr(args, "arms", ()) or ()))
    sft_arms, pair_arms, kd_arm_names, opd_arms = arms_to_run(plan.arms)
    started = time.time()
    recipe_for, shared, prompts, verify, info = shared_setup(args.recipe, args.items, plan)
    k = shared.configs["evaluate"].pass_k

    runs: dict[int, dict[str, dict]] = {}
    evaluations: dict[int, str] = {}
    capture = None  # the KD arms' teacher distributions, captured at the first seed
    for seed in plan.seeds:
        seeded = [f"select.seed={seed}", f"sft.seed={seed}", f"redi.seed={seed}",
                  f"kd.seed={seed}", f"opd.seed={seed}", f"evaluate.seed={seed}"]
        paths, data = {}, {}
        for arm in sft_arms:
            select, sft = sft_arm(recipe_for(*SFT_ARMS[arm], *seeded), verify)
            paths[arm] = sft.path
            data[arm] = {"sft_rows": select.manifest["stats"]["sft_rows"],
                         "mean_sft_tokens": select.manifest["stats"]["mean_sft_tokens"],
                         "select": select, "sft": sft}
        start = data.get(PAIR_START)
        for arm in pair_arms:
            r = recipe_for(*SFT_ARMS[PAIR_START], *PAIR_ARMS[arm], *seeded)
            redi = run_stage("redi", r, {"select": start["select"].version,
                                         "sft": start["sft"].version})
            paths[arm] = redi.path
            data[arm] = {"pairs": start["select"].manifest["stats"]["pairs"], "redi": redi,
                         "tokens": redi.manifest["stats"].get("tokens_seen")}
        kd_start = data.get(KD_START)
        capture, kds = kd_arms(recipe_for, kd_arm_names, seeded, kd_start, capture)
        for arm, kd in kds.items():
            paths[arm] = kd.path
            data[arm] = {m: kd_start[m] for m in ("sft_rows", "mean_sft_tokens")}
        for arm in opd_arms:
            opd = opd_arm(recipe_for(*SFT_ARMS[OPD_START], *OPD_ARMS[arm], *seeded),
                          data[OPD_START]["select"], data[OPD_START]["sft"], prompts)
            paths[arm] = opd.path
            data[arm] = {"tokens": sum(h["tokens_seen"] or 0
                                       for h in opd.manifest["stats"]["iterations"]),
                         "pass_rate": opd.manifest["stats"]["pass_rate"]}
        # One evaluate per seed with every model of the seed (the teacher once, at the first).
        names = (["teacher"] if seed == plan.seeds[0] else []) + ["student"] + list(paths)
        model_list = "[" + ", ".join(["teacher"] * (seed == plan.seeds[0]) + ["student"]
                                     + [paths[a] for a in paths]) + "]"
        r = recipe_for(*seeded, f"evaluate.models={model_list}")
        # every model is named by path: evaluate needs no sft / redi input (pinned when run,
        # so the version records them)
        pins = {"prompts": prompts.version}
        if start:
            pins["sft"] = start["sft"].version
        if "redi" in data:
            pins["redi"] = data["redi"]["redi"].version
        ev = run_stage("evaluate", r, pins)
        summary_rows = ev.read_table("summary").to_pylist()
        evaluations[seed] = ev.ref()
        runs[seed] = {}
        for name in names:
            key = name if name in ("teacher", "student") else paths[name]
            runs[seed][name] = {**_overall(summary_rows, key),
                                **{m: data.get(name, {}).get(m)
                                   for m in ("sft_rows", "mean_sft_tokens", "pairs", "tokens",
                                             "pass_rate")}}
        print(f"ablations: seed {seed} done ({time.time() - started:.0f} s so far)", flush=True)
        # Written after every seed (complete: false until the last), so a stopped run keeps
        # the seeds it finished.
        result = write_result(shared.data_root, plan, runs, evaluations, k, started, info)

    summary, checks, out = result["summary"], result["targets"], result["path"]
    text = format_summary(summary, k)
    print("\nablations (mean ± sample sd over seeds " + ", ".join(map(str, plan.seeds)) + "):")
    print(text + "\n\n" + "\n".join(checks))
    print(f"\nablations: {time.time() - started:.0f} s wall; {out}")
    sys.stdout.flush()
    return 0
