"""The settings sweeps behind the ablations:

    python -m pipeline.apps.sweeps redi|dap|kd|opd [key=value …]

Each chooses settings on data the ablations never report, so the ablations' seeds stay unpicked:
  - their own seed (TUNING_SEED, not in pipeline/apps/ablations.py SEEDS) for select / SFT / REDI /
    evaluate sampling;
  - their own problems (VALIDATION_SEED instead of the held-out set's synthetic_seed; still
    decontaminated against the training prompts by evaluate).
Each grid and its pick rule were written down before the sweep ran.

redi: REDI's alpha and LR (the paper's alpha 0.8 at an LR set before any run, 1e-5, was the
  starting point: docs/demo.md). From the tuning seed's `all` SFT model and its REDI pairs
  (the ablations' PAIR_START), every (LR, alpha) of REDI_GRID trains for the same steps;
  alpha 0 is SFT continued at that LR (the ablations' control). Rule: the LR and alpha > 0 with the largest pass@1 margin over
  alpha 0 at the same LR; the ablations then run every pair arm at that LR and REDI at that
  alpha. Written to <data_root>/redi_sweep.json.
dap: DAP budget mode's budgets, loose to tight (DAP_GRID; the first is the demo's). Each trains
  the ablations' dap_budget arm (the shortest correct trace within budget, one per problem)
  from the base student, beside the unpruned `random` arm. Rule: the loosest budgets whose SFT
  traces are >= 30% shorter than random's with pass@1 >= random's - 0.01 (the issue's target),
  or none. Written to <data_root>/dap_sweep.json.
kd: kd's kd_ratio (forward KL; the ablations' first run used 0.5, torchtune's and DistillKit's
  default, and KD missed SFT + 0.03: docs/demo.md). From the base student on the tuning seed's
  `all` arm (the ablations' KD_START) and one capture of its distributions, every kd_ratio of
  KD_GRID trains with sft's schedule; kd_ratio 0 is sft's loss through kd's code (a control that
  should land near the SFT model). Rule: the kd_ratio > 0 with the largest pass@1 margin over
  the `all` SFT model; the ablations' KD arms then run at it. Written to
  <data_root>/kd_sweep.json.
opd: opd's learning rate (METHODS' 5e-5 is for full fine-tuning of real models; this student
  was trained at 3e-3 and the pair arms run at 3e-5). From the tuning seed's `all` SFT model
  (the ablations' OPD_START), the ablations' OPD arm at every LR of OPD_GRID. Rule: the LR with
  the largest pass@1 margin over that SFT model (the first on a tie); the ablations' OPD arm
  then runs at it. Written to <data_root>/opd_sweep.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from pipeline.apps import ablations
from pipeline.cli import run_guarded
from pipeline.runner import run_stage

TUNING_SEED = 100
VALIDATION_SEED = 424242
REDI_GRID = {"learning_rate": (1e-5, 3e-5), "alpha": (0.0, 0.2, 0.5, 0.8)}
# (easy, medium, hard) token budgets by the teacher's pass-rate level, loose to tight.
DAP_GRID = ((40, 56, 80), (36, 48, 64), (34, 44, 56))
KD_GRID = {"kd_ratio": (0.0, 0.25, 0.5, 0.75, 1.0)}
OPD_GRID = {"learning_rate": (3e-5, 1e-4, 3e-4)}


def pick_redi(runs: list[dict]) -> dict:
    """The redi rule: each run's pass@1 margin over alpha 0 at its LR (written into the runs),
    then the LR and alpha > 0 with the largest margin (the first on a tie)."""
    control = {run["learning_rate"]: run["pass_at_1"] for run in runs if run["alpha"] == 0.0}
    for run in runs:
        run["margin_vs_alpha0"] = run["pass_at_1"] - control[run["learning_rate"]]
    best = max((run for run in runs if run["alpha"] > 0), key=lambda run: run["margin_vs_alpha0"])
    return {"learning_rate": best["learning_rate"], "alpha": best["alpha"]}


def pick_dap(runs: list[dict], random_arm: dict) -> dict | None:
    """The dap rule: each run's SFT-token cut and pass@1 difference against the random arm
    (written into the runs), then the loosest budgets (runs are loose to tight) with a cut of
    >= 30% and pass@1 >= random's - 0.01; None when no budgets reach both."""
    for run in runs:
        run["token_cut"] = 1 - run["mean_sft_tokens"] / random_arm["mean_sft_tokens"]
        run["pass_at_1_vs_random"] = run["pass_at_1"] - random_arm["pass_at_1"]
    ok = [run for run in runs if run["token_cut"] >= 0.30 and run["pass_at_1_vs_random"] >= -0.01]
    return {"budgets": ok[0]["budgets"]} if ok else None


def pick_kd(runs: list[dict], sft_run: dict) -> dict:
    """The kd rule: each run's pass@1 margin over the `all` SFT model (written into the runs),
    then the kd_ratio > 0 with the largest margin (the first on a tie)."""
    for run in runs:
        run["margin_vs_sft"] = run["pass_at_1"] - sft_run["pass_at_1"]
    best = max((run for run in runs if run["kd_ratio"] > 0), key=lambda run: run["margin_vs_sft"])
    return {"kd_ratio": best["kd_ratio"]}


def pick_opd(runs: list[dict], sft_run: dict) -> dict:
    """The opd rule: each run's pass@1 margin over the SFT start (written into the runs), then
    the LR with the largest margin (the first on a tie)."""
    for run in runs:
        run["margin_vs_sft"] = run["pass_at_1"] - sft_run["pass_at_1"]
    best = max(runs, key=lambda run: run["margin_vs_sft"])
    return {"learning_rate": best["learning_rate"]}


def _setup(argv: list[str], prog: str):
    """The ablations' start (pipeline/apps/ablations.py shared_setup) with the tuning seed last."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--recipe", default="configs/tiny.yaml")
    parser.add_argument("items", nargs="*", help="key=value overrides (e.g. data_root=/tmp/demo)")
    args = parser.parse_args(argv)
    seeded = [f"{s}.seed={TUNING_SEED}" for s in ("select", "sft", "redi", "kd", "opd",
                                                  "evaluate")]
    recipe_for, shared, prompts, verify, _ = ablations.shared_setup(
        args.recipe, args.items, ablations.AblationPlan(), last=tuple(seeded))
    return recipe_for, shared, prompts, verify


def _evaluate(recipe_for, prompts, sft, redi, paths: list[str]) -> dict:
    """pass@1 / pass@k / own tokens of every model path, on the validation problems. redi:
    None = the data root's latest (evaluate resolves an sft and a redi input even when its
    models are all paths; `make pipeline` in the same data root made one)."""
    r = recipe_for("evaluate.models=[" + ", ".join(paths) + "]",
                   f"evaluate.synthetic_seed={VALIDATION_SEED}")
    pins = {"prompts": prompts.version, "sft": sft.version}
    if redi is not None:
        pins["redi"] = redi.version
    ev = run_stage("evaluate", r, pins)
    rows = {row["model"]: row for row in ev.read_table("summary").to_pylist()
            if row["difficulty"] == "all"}
    return {"evaluate": ev.ref(),
            "rows": {p: {m: rows[p][m] for m in ("pass_at_1", "pass_at_k",
                                                 "mean_completion_tokens")} for p in paths}}


def _write(shared, name: str, result: dict) -> str:
    out = os.path.join(shared.data_root, name)
    with open(out + ".tmp", "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(out + ".tmp", out)
    return out


def redi(argv: list[str]) -> int:
    started = time.time()
    recipe_for, shared, prompts, verify = _setup(argv, "python -m pipeline.apps.sweeps redi")
    start_arm = ablations.SFT_ARMS[ablations.PAIR_START]
    select, sft = ablations.sft_arm(recipe_for(*start_arm), verify)
    paths, last = {}, None
    for lr in REDI_GRID["learning_rate"]:
        for alpha in REDI_GRID["alpha"]:
            # LR written out in decimals: YAML reads "1e-05" as a string.
            r = recipe_for(*start_arm, "redi.loss=redi", f"redi.alpha={alpha}",
                           f"redi.learning_rate={lr:.8f}")
            last = run_stage("redi", r, {"select": select.version, "sft": sft.version})
            paths[last.path] = (lr, alpha)
    ev = _evaluate(recipe_for, prompts, sft, last, [sft.path] + list(paths))
    runs = [{"learning_rate": lr, "alpha": alpha, **ev["rows"][path]}
            for path, (lr, alpha) in paths.items()]
    result = {"sft_start": ev["rows"][sft.path]["pass_at_1"], "runs": runs,
              "pairs": select.manifest["stats"]["pairs"], "evaluate": ev["evaluate"],
              "chosen": pick_redi(runs), "wall_s": round(time.time() - started, 1)}
    out = _write(shared, "redi_sweep.json", result)
    print(f"REDI sweep (seed {TUNING_SEED}, validation problems seed {VALIDATION_SEED}, "
          f"{result['pairs']} pairs; SFT start pass@1 {result['sft_start']:.3f}):")
    print(f"{'LR':>8} {'alpha':>6} {'pass@1':>7} {'pass@k':>7} {'own tok':>8} {'vs a=0':>7}")
    for run in runs:
        print(f"{run['learning_rate']:>8g} {run['alpha']:>6g} {run['pass_at_1']:>7.3f} "
              f"{run['pass_at_k']:>7.3f} {run['mean_completion_tokens']:>8.1f} "
              f"{run['margin_vs_alpha0']:>+7.3f}")
    print(f"chosen: {result['chosen']} ({result['wall_s']:.0f} s); {out}")
    return 0


def dap(argv: list[str]) -> int:
    started = time.time()
    recipe_for, shared, prompts, verify = _setup(argv, "python -m pipeline.apps.sweeps dap")
    arms = {}
    select, sft = ablations.sft_arm(recipe_for(*ablations.SFT_ARMS["random"]), verify)
    arms["random"] = (None, select, sft)
    for easy, medium, hard in DAP_GRID:
        budgets = f"{{easy: {easy}, medium: {medium}, hard: {hard}}}"
        r = recipe_for(*ablations.SFT_ARMS["dap_budget"], f"prune.budgets={budgets}")
        arms[budgets] = (budgets, *ablations.sft_arm(r, verify))
    ev = _evaluate(recipe_for, prompts, sft, None, [a[2].path for a in arms.values()])

    def row(budgets, select, sft):
        return {"budgets": budgets, "sft_rows": select.manifest["stats"]["sft_rows"],
                "mean_sft_tokens": select.manifest["stats"]["mean_sft_tokens"],
                **ev["rows"][sft.path]}

    random_arm = row(*arms.pop("random"))
    runs = [row(*a) for a in arms.values()]
    result = {"random": random_arm, "runs": runs, "evaluate": ev["evaluate"],
              "chosen": pick_dap(runs, random_arm), "wall_s": round(time.time() - started, 1)}
    out = _write(shared, "dap_sweep.json", result)
    print(f"DAP budget sweep (seed {TUNING_SEED}, validation problems seed {VALIDATION_SEED}; "
          f"random: {random_arm['sft_rows']} rows of {random_arm['mean_sft_tokens']:.1f} "
          f"tokens, pass@1 {random_arm['pass_at_1']:.3f}):")
    print(f"{'budgets':>36} {'rows':>5} {'tokens':>7} {'cut':>5} {'pass@1':>7} {'vs rnd':>7} "
          f"{'own tok':>8}")
    for run in runs:
        print(f"{run['budgets']:>36} {run['sft_rows']:>5} {run['mean_sft_tokens']:>7.1f} "
              f"{run['token_cut']:>5.0%} {run['pass_at_1']:>7.3f} "
              f"{run['pass_at_1_vs_random']:>+7.3f} {run['mean_completion_tokens']:>8.1f}")
    print(f"chosen: {result['chosen']} ({result['wall_s']:.0f} s); {out}")
    return 0


def kd(argv: list[str]) -> int:
    started = time.time()
    recipe_for, shared, prompts, verify = _setup(argv, "python -m pipeline.apps.sweeps kd")
    start_arm = ablations.SFT_ARMS[ablations.KD_START]
    select, sft = ablations.sft_arm(recipe_for(*start_arm), verify)
    like_sft = ablations.same_as_sft(recipe_for(*start_arm))
    capture = run_stage("distributions", recipe_for(*start_arm, *like_sft),
                        {"select": select.version})
    paths = {}
    for ratio in KD_GRID["kd_ratio"]:
        r = recipe_for(*start_arm, *like_sft, "kd.divergence=forward_kl", f"kd.kd_ratio={ratio}")
        paths[run_stage("kd", r, {"distributions": capture.version}).path] = ratio
    ev = _evaluate(recipe_for, prompts, sft, None, [sft.path] + list(paths))
    sft_run = ev["rows"][sft.path]
    runs = [{"kd_ratio": ratio, **ev["rows"][path]} for path, ratio in paths.items()]
    result = {"sft": sft_run, "runs": runs, "sft_rows": select.manifest["stats"]["sft_rows"],
              "evaluate": ev["evaluate"], "chosen": pick_kd(runs, sft_run),
              "wall_s": round(time.time() - started, 1)}
    out = _write(shared, "kd_sweep.json", result)
    print(f"kd sweep (seed {TUNING_SEED}, validation problems seed {VALIDATION_SEED}, "
          f"{result['sft_rows']} SFT rows; the `all` SFT model's pass@1 "
          f"{sft_run['pass_at_1']:.3f}):")
    print(f"{'kd_ratio':>8} {'pass@1':>7} {'pass@k':>7} {'own tok':>8} {'vs SFT':>7}")
    for run in runs:
        print(f"{run['kd_ratio']:>8g} {run['pass_at_1']:>7.3f} {run['pass_at_k']:>7.3f} "
              f"{run['mean_completion_tokens']:>8.1f} {run['margin_vs_sft']:>+7.3f}")
    print(f"chosen: {result['chosen']} ({result['wall_s']:.0f} s); {out}")
    return 0


def opd(argv: list[str]) -> int:
    started = time.time()
    recipe_for, shared, prompts, verify = _setup(argv, "python -m pipeline.apps.sweeps opd")
    start_arm = ablations.SFT_ARMS[ablations.OPD_START]
    select, sft = ablations.sft_arm(recipe_for(*start_arm), verify)
    paths = {}
    for lr in OPD_GRID["learning_rate"]:
        # the arm's settings with this LR last (LR in decimals: YAML reads "1e-05" as a string)
        r = recipe_for(*start_arm, *ablations.OPD_ARMS["opd"], f"opd.learning_rate={lr:.8f}")
        version = ablations.opd_arm(r, select, sft, prompts)
        paths[version.path] = (lr, version.manifest["stats"]["pass_rate"])
    ev = _evaluate(recipe_for, prompts, sft, None, [sft.path] + list(paths))
    sft_run = ev["rows"][sft.path]
    runs = [{"learning_rate": lr, "sample_pass_rate": curve, **ev["rows"][path]}
            for path, (lr, curve) in paths.items()]
    result = {"sft": sft_run, "runs": runs, "evaluate": ev["evaluate"],
              "chosen": pick_opd(runs, sft_run), "wall_s": round(time.time() - started, 1)}
    out = _write(shared, "opd_sweep.json", result)
    print(f"opd sweep (seed {TUNING_SEED}, validation problems seed {VALIDATION_SEED}; the "
          f"`all` SFT start's pass@1 {sft_run['pass_at_1']:.3f}):")
    print(f"{'LR':>8} {'pass@1':>7} {'pass@k':>7} {'own tok':>8} {'vs SFT':>7}  samples' pass "
          "rate by iteration")
    for run in runs:
        print(f"{run['learning_rate']:>8g} {run['pass_at_1']:>7.3f} {run['pass_at_k']:>7.3f} "
              f"{run['mean_completion_tokens']:>8.1f} {run['margin_vs_sft']:>+7.3f}  "
              + " ".join(f"{p:.2f}" for p in run["sample_pass_rate"]))
    print(f"chosen: {result['chosen']} ({result['wall_s']:.0f} s); {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sweeps = {"redi": redi, "dap": dap, "kd": kd, "opd": opd}
    if not argv or argv[0] not in sweeps:
        print("usage: python -m pipeline.apps.sweeps redi|dap|kd|opd [--recipe …] "
              "[key=value …]", file=sys.stderr)
        return 2

    # As the distillery CLI: a user's mistake (here or inside a Ray worker) is one line, exit 2.
    return run_guarded(sweeps[argv[0]], argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
