"""`distillery demo --ablations`: the table code on known numbers, then a shortened real run
(one seed, a 1-layer teacher that memorizes 40 problems, tiny counts) through every arm: DAP
budget and rewrite, provenance, SFT, REDI / DPO / SimPO / SFT continued, one evaluate (slow);
every arm's recipe and pins without training anything (fast)."""
from __future__ import annotations

import argparse
import json
import os

import pytest

from pipeline.apps.ablations import (COMPARISONS, KD_ARMS, KD_START, OPD_ARMS, OPD_START,
                                     PAIR_ARMS, PAIR_START,
                                     SFT_ARMS, AblationPlan, format_summary, mean_sd, summarize,
                                     targets)
from stages import STAGES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _runs():
    base = {"random": (0.50, 40.0, 50.0), "dap_budget": (0.495, 30.0, 33.0),
            "dap_rewrite": (0.47, 31.0, 34.0), "provenance": (0.53, 45.0, 60.0),
            "all": (0.55, 41.0, 52.0), "redi": (0.57, 40.0, None), "dpo": (0.56, 40.0, None),
            "simpo": (0.54, 40.0, None), "sft_cont": (0.555, 40.0, None),
            "kd": (0.59, 40.0, 52.0), "taid": (0.60, 40.0, 52.0), "mixkd": (0.58, 40.0, 52.0),
            "opd": (0.58, 38.0, None)}
    runs = {}
    for seed, shift in ((0, 0.0), (1, 0.01), (2, -0.01)):
        runs[seed] = {arm: {"pass_at_1": p + shift, "pass_at_k": p + 0.2,
                            "mean_completion_tokens": own + seed, "sft_rows": 100,
                            "mean_sft_tokens": sft}
                      for arm, (p, own, sft) in base.items()}
    return runs


def test_mean_and_sample_sd():
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_sd([4.0]) == (4.0, None) and mean_sd([]) == (None, None)


def test_summary_pairs_differences_per_seed_and_states_each_target():
    summary = summarize(_runs())
    arms = summary["arms"]
    assert arms["random"]["pass_at_1"][0] == pytest.approx(0.50)
    assert arms["random"]["pass_at_1"][1] == pytest.approx(0.01)   # sd of 0.50, 0.51, 0.49
    assert arms["redi"]["mean_sft_tokens"] == [None, None] and arms["all"]["seeds"] == 3
    by = {c["name"]: c for c in summary["comparisons"]}
    assert set(by) == {name for name, _, _ in COMPARISONS}
    # The same shift on every arm per seed: the paired differences have no spread.
    redi = by["REDI vs SFT continued"]
    assert redi["pass_at_1"][0] == pytest.approx(0.015) and redi["pass_at_1"][1] == pytest.approx(0)
    assert by["DAP budget vs unpruned"]["mean_sft_tokens"][0] == pytest.approx(-17.0)
    checks = targets(summary)
    # dap_budget: -34% tokens, pass@1 -0.005, own tokens -10: met; dap_rewrite pass@1 -0.03: missed
    assert checks[0].startswith("[met] dap_budget: SFT-trace tokens -34%")
    assert checks[1].startswith("[MISSED] dap_rewrite")
    assert any(c.startswith("[met] REDI - SFT continued: pass@1 0.015") for c in checks)
    assert any(c.startswith("[met] REDI - DPO") for c in checks)
    assert any(c.startswith("[met] provenance - random") for c in checks)
    # kd 0.59 vs all 0.55: +0.04 >= +0.03
    assert any(c.startswith("[met] KD - SFT: pass@1 0.040") for c in checks)
    assert by["TAID vs forward KL"]["pass_at_1"][0] == pytest.approx(0.01)
    assert by["MixKD vs forward KL"]["pass_at_1"][0] == pytest.approx(-0.01)
    # opd 0.58 vs sft_cont 0.555: +0.025 < +0.03 missed; vs redi 0.57: +0.01 met
    assert any(c.startswith("[MISSED] OPD - SFT continued: pass@1 0.025") for c in checks)
    assert any(c.startswith("[met] OPD - REDI: pass@1 0.010") for c in checks)
    text = format_summary(summary, k=4)
    assert "pass@4" in text and "0.500 ± 0.010" in text and "REDI vs SFT continued" in text


def test_a_seed_missing_an_arm_is_left_out_of_that_comparison():
    runs = _runs()
    del runs[2]["dpo"]
    by = {c["name"]: c for c in summarize(runs)["comparisons"]}
    assert len(by["REDI vs DPO"]["per_seed"]["pass_at_1"]) == 2
    assert len(by["REDI vs SFT continued"]["per_seed"]["pass_at_1"]) == 3


# --- every arm's wiring, nothing trained ------------------------------------------------------

class _FakeVersion:
    """What ablations.main reads of a version: the real version hash of the stage, config and
    pinned inputs (so equal settings share a version, as in the store), a path, stats."""

    def __init__(self, name, recipe, inputs, models=()):
        from pipeline.runner import version_hash

        self.stage = name
        self.version = version_hash(STAGES[name], recipe.configs[name], inputs)
        self.path = f"/versions/{name}/{self.version}"
        self.manifest = {"stats": {"sft_rows": 10, "mean_sft_tokens": 30.0, "pairs": 4,
                                   "tokens_seen": 500, "pass_rate": [0.1, 0.2],
                                   "iterations": [{"tokens_seen": 250}] * 2}}
        self._models = list(models)

    def ref(self):
        return f"{self.stage}@{self.version}"

    def read_table(self, split=None):
        import pyarrow as pa

        assert split == "summary"
        return pa.Table.from_pylist([{"model": m, "difficulty": "all", "pass_at_1": 0.25,
                                      "pass_at_k": 0.5, "mean_completion_tokens": 20.0}
                                     for m in self._models])


def _run_without_training(tmp_path, monkeypatch, plan):
    """ablations.main with a run_stage that trains nothing; every call it made (name, recipe,
    pins, version), and the teacher, student and data root it ran with."""
    from pipeline.apps import ablations, demo
    from pipeline.apps.ablations import main

    calls = []

    def fake_run_stage(name, recipe, pins=None, **_):
        pins = pins or {}
        stage = STAGES[name]
        # Every input the config reads is pinned; a pin of an input it does not read is allowed
        # (the runner resolves what it is given), one it cannot read is not.
        used = stage.uses(recipe.configs[name]) if stage.uses else set(stage.reads)
        assert set(used) <= set(pins) <= set(stage.reads), (name, pins)
        made = {(c["name"], c["version"].version) for c in calls}
        assert all((src, v) in made for src, v in pins.items()), (name, pins)
        inputs = {src: next(c["version"] for c in calls if c["name"] == src
                            and c["version"].version == v) for src, v in pins.items()}
        models = recipe.configs["evaluate"].models if name == "evaluate" else ()
        version = _FakeVersion(name, recipe, inputs, models)
        calls.append({"name": name, "recipe": recipe, "pins": pins, "version": version})
        return version

    monkeypatch.setattr(ablations, "run_stage", fake_run_stage)
    teacher, student = str(tmp_path / "teacher"), str(tmp_path / "student")
    monkeypatch.setattr(demo, "prepare", lambda *a, **k: (None, teacher, student, {}))
    root = str(tmp_path / "data")
    os.makedirs(root, exist_ok=True)  # where ablations.json goes; the fake stages write nothing
    args = argparse.Namespace(recipe=os.path.join(ROOT, "configs", "tiny.yaml"),
                              items=[f"data_root={root}"], ablations=True)
    assert main(args, plan) == 0
    return calls, teacher, student, root


def test_every_arm_loads_its_recipe_and_pins_its_inputs(tmp_path, monkeypatch):
    """ablations.main end to end with a run_stage that trains nothing: every arm's overrides
    load as a recipe (the real load_recipe via demo.load) and set what the arm says; every stage
    gets every input it reads pinned to the version made for that arm; the pair arms start from
    the `all` arm's select and sft; distributions reads the `all` arm's select and every KD arm
    that distributions version, with sft's schedule; one evaluate holds every model."""
    from pipeline.config import parse_override

    calls, teacher, student, root = _run_without_training(tmp_path, monkeypatch,
                                                          AblationPlan(seeds=(3,)))

    names = [c["name"] for c in calls]
    sft_calls = ["prune", "provenance", "select", "sft"]
    assert names == (["prompts", "generate", "verify"] + sft_calls * len(SFT_ARMS)
                     + ["redi"] * len(PAIR_ARMS) + ["distributions"] + ["kd"] * len(KD_ARMS)
                     + ["opd"] * len(OPD_ARMS) + ["evaluate"])
    seeded = ["select.seed=3", "sft.seed=3", "redi.seed=3", "kd.seed=3", "opd.seed=3",
              "evaluate.seed=3"]
    arm_calls = {arm: calls[3 + 4 * i: 7 + 4 * i] for i, arm in enumerate(SFT_ARMS)}
    arm_calls.update({arm: [calls[3 + 4 * len(SFT_ARMS) + i]] for i, arm in enumerate(PAIR_ARMS)})
    at = 3 + 4 * len(SFT_ARMS) + len(PAIR_ARMS)
    distributions = calls[at]
    arm_calls.update({arm: [calls[at + 1 + i]] for i, arm in enumerate(KD_ARMS)})
    at += 1 + len(KD_ARMS)
    arm_calls.update({arm: [calls[at + i]] for i, arm in enumerate(OPD_ARMS)})
    arms = {**SFT_ARMS, **{a: SFT_ARMS[PAIR_START] + o for a, o in PAIR_ARMS.items()},
            **{a: SFT_ARMS[KD_START] + o for a, o in KD_ARMS.items()},
            **{a: SFT_ARMS[OPD_START] + o for a, o in OPD_ARMS.items()}}
    for arm, overrides in arms.items():
        for call in arm_calls[arm]:
            r = call["recipe"]
            assert r.teacher == teacher and r.student == student and r.data_root == root
            for text in overrides + seeded:   # the arm's settings reach its stages
                (stage, *key), value = parse_override(text)
                if stage == "resources":
                    assert getattr(r.resources[key[0]], key[1]) == value, (arm, text)
                else:
                    assert getattr(r.configs[stage], key[0]) == value, (arm, text)
    # The data arms differ in what select hands SFT: five SFT models, five select versions.
    assert len({arm_calls[a][3]["version"].version for a in SFT_ARMS}) == len(SFT_ARMS)
    start = arm_calls[PAIR_START]
    for arm in PAIR_ARMS:
        assert arm_calls[arm][0]["pins"] == {"select": start[2]["version"].version,
                                             "sft": start[3]["version"].version}
    assert [arm_calls[a][0]["recipe"].configs["redi"].loss for a in PAIR_ARMS] == \
        ["redi", "dpo", "simpo", "redi"]
    assert len({arm_calls[a][0]["version"].version for a in PAIR_ARMS}) == len(PAIR_ARMS)
    # KD: the teacher's distributions of the `all` arm's traces; every KD arm reads them, with
    # sft's schedule and text settings (same traces, same steps), from the base student
    kd_start = arm_calls[KD_START]
    assert distributions["pins"] == {"select": kd_start[2]["version"].version}
    sft = kd_start[3]["recipe"].configs["sft"]
    for arm in KD_ARMS:
        call = arm_calls[arm][0]
        assert call["pins"] == {"distributions": distributions["version"].version}
        kd = call["recipe"].configs["kd"]
        for key in ("epochs", "max_steps", "learning_rate", "tokens_per_step", "max_length",
                    "warmup_ratio", "seed"):
            assert getattr(kd, key) == getattr(sft, key), (arm, key)
        assert kd.student == sft.student == student and kd.teacher == teacher
    dist = distributions["recipe"].configs["distributions"]
    assert (dist.max_length, dist.overlong) == (sft.max_length, sft.overlong)
    assert [arm_calls[a][0]["recipe"].configs["kd"].divergence for a in KD_ARMS] == \
        ["forward_kl", "taid", "forward_kl"]
    assert [arm_calls[a][0]["recipe"].configs["kd"].online_teacher for a in KD_ARMS] == \
        [False, False, True]
    # OPD: from the `all` arm's sft, on its select's problems, verified against prompts
    opd_start = arm_calls[OPD_START]
    for arm in OPD_ARMS:
        assert arm_calls[arm][0]["pins"] == {"select": opd_start[2]["version"].version,
                                             "sft": opd_start[3]["version"].version,
                                             "prompts": calls[0]["version"].version}
        assert arm_calls[arm][0]["recipe"].configs["opd"].teacher == teacher
    evaluate = calls[-1]["recipe"].configs["evaluate"]
    assert evaluate.models == ["teacher", "student"] + [
        arm_calls[a][-1]["version"].path for a in list(SFT_ARMS) + list(PAIR_ARMS)
        + list(KD_ARMS) + list(OPD_ARMS)]
    with open(os.path.join(root, "ablations.json")) as f:
        result = json.load(f)
    assert result["complete"] and set(result["runs"]["3"]) == {"teacher", "student", *arms}


@pytest.mark.parametrize("arms, sft_arms, runs", [
    (("kd", "taid"), ["all"], ["distributions", "kd", "kd"]),
    (("dpo",), ["all"], ["redi"]),
    (("opd",), ["all"], ["opd"]),
    (("random", "provenance"), ["random", "provenance"], []),
])
def test_arms_run_only_those_and_their_start(tmp_path, monkeypatch, arms, sft_arms, runs):
    """--arms: the named arms and the SFT arm a pair or KD arm starts from, nothing else (no
    distributions without a KD arm); evaluate holds exactly their models."""
    calls, *_ = _run_without_training(tmp_path, monkeypatch,
                                      AblationPlan(seeds=(0,), arms=arms))
    assert [c["name"] for c in calls] == (["prompts", "generate", "verify"]
                                          + ["prune", "provenance", "select", "sft"]
                                          * len(sft_arms) + runs + ["evaluate"])
    trained = [c["version"].path for c in calls if c["name"] in ("sft", "redi", "kd", "opd")]
    assert calls[-1]["recipe"].configs["evaluate"].models == ["teacher", "student"] + trained
    with open(tmp_path / "data" / "ablations.json") as f:
        assert set(json.load(f)["runs"]["0"]) == {"teacher", "student", *sft_arms, *arms}


def test_one_capture_serves_every_seed(tmp_path, monkeypatch):
    """The KD arms' start keeps every correct trace, so the teacher's distributions are captured
    at the first seed only; each later seed's kd fits read that version, with their own seed."""
    calls, *_ = _run_without_training(tmp_path, monkeypatch,
                                      AblationPlan(seeds=(0, 1), arms=("kd", "taid")))
    assert [c["name"] for c in calls].count("distributions") == 1
    capture = next(c for c in calls if c["name"] == "distributions")
    kd = [c for c in calls if c["name"] == "kd"]
    assert len(kd) == 4
    assert all(c["pins"] == {"distributions": capture["version"].version} for c in kd)
    assert [c["recipe"].configs["kd"].seed for c in kd] == [0, 0, 1, 1]
    assert len({c["version"].version for c in kd}) == 4


def test_unknown_arm_is_a_user_error(tmp_path):
    import subprocess
    import sys

    from pipeline.apps.ablations import arms_to_run
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="--arms: unknown arm.*nope"):
        arms_to_run(("kd", "nope"))
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "demo", "--arms", "kd"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "use it with --ablations" in out.stderr
    assert "Traceback" not in out.stderr


# --- a shortened real run -----------------------------------------------------------------------

# A 1-layer teacher trained on the 40 prompt problems themselves (train_seed = prompts' seed 0):
# it memorizes them in a few hundred steps, and the slips at carry/borrow steps still give it
# wrong traces, so every arm has correct traces and pairs.
TINY_TEACHER = dict(steps=500, student_steps=60, batch=16, lr=3e-3, seed=0, train_n=40,
                    train_seed=0, shape=dict(layers=1, hidden=128, heads=2, kv_heads=2,
                                             intermediate=256, vocab=512))
TINY = ["prompts.synthetic_n=40", "generate.n=4", "generate.shard_size=80",
        "provenance.shard_size=64", "sft.epochs=1", "sft.tokens_per_step=2048",
        "sft.save_steps=0", "redi.pairs_per_step=8", "redi.max_steps=2", "redi.save_steps=0",
        "evaluate.synthetic_n=12", "evaluate.samples=2", "evaluate.pass_k=2"]


@pytest.mark.slow
def test_shortened_ablations_run_every_arm(tmp_path, ray_cluster, capsys):
    from pipeline.apps.ablations import main

    root = str(tmp_path / "data")
    args = argparse.Namespace(recipe=os.path.join(ROOT, "configs", "tiny.yaml"),
                              items=[f"data_root={root}"], ablations=True)
    # the KD arms (distributions + 3 kd fits) are left out: minutes more on 2 cores; the fast
    # wiring test above covers their recipes and pins
    assert main(args, AblationPlan(seeds=(0,), extra=TINY, teacher=TINY_TEACHER,
                                   arms=tuple(SFT_ARMS) + tuple(PAIR_ARMS))) == 0
    out = capsys.readouterr().out
    with open(os.path.join(root, "ablations.json")) as f:
        result = json.load(f)
    run = result["runs"]["0"]
    assert set(run) == {"teacher", "student"} | set(SFT_ARMS) | set(PAIR_ARMS)
    for arm in list(SFT_ARMS) + list(PAIR_ARMS) + ["student"]:
        assert 0.0 <= run[arm]["pass_at_1"] <= run[arm]["pass_at_k"] <= 1.0
    # Equal-size arms: one trace per problem with a correct one; `all` keeps every one.
    sizes = {arm: run[arm]["sft_rows"] for arm in SFT_ARMS}
    assert sizes["random"] == sizes["provenance"] and sizes["all"] >= sizes["random"] > 0
    # DAP's budget arm keeps the shortest trace within budget: never longer than random's.
    assert run["dap_budget"]["mean_sft_tokens"] <= run["random"]["mean_sft_tokens"]
    # The pair arms trained on the same pairs; the printed tables and targets are there.
    assert len({run[a]["pairs"] for a in PAIR_ARMS}) == 1 and run["redi"]["pairs"] > 0
    assert "paired difference" in out and "REDI - SFT continued" in out
    assert len(result["targets"]) == 5

    from pipeline.apps.report import write_report
    from pipeline.store import Store

    html = open(write_report(Store(root), str(tmp_path / "report.html"))).read()
    assert "Ablations" in html and "REDI vs SFT continued" in html


def test_redi_sweep_picks_the_largest_margin_over_alpha_0_at_the_same_lr():
    from pipeline.apps.sweeps import pick_redi as pick

    runs = [{"learning_rate": 1e-5, "alpha": 0.0, "pass_at_1": 0.30},
            {"learning_rate": 1e-5, "alpha": 0.5, "pass_at_1": 0.32},   # +0.02
            {"learning_rate": 3e-5, "alpha": 0.0, "pass_at_1": 0.20},
            {"learning_rate": 3e-5, "alpha": 0.5, "pass_at_1": 0.25},   # +0.05: the pick,
            {"learning_rate": 3e-5, "alpha": 0.8, "pass_at_1": 0.25}]   # not this tie after it
    # The best absolute pass@1 (0.32 at 1e-5) is not the pick: the margin at the same LR is.
    assert pick(runs) == {"learning_rate": 3e-5, "alpha": 0.5}
    assert [round(r["margin_vs_alpha0"], 3) for r in runs] == [0.0, 0.02, 0.0, 0.05, 0.05]


def test_dap_sweep_picks_the_loosest_budgets_that_meet_the_target():
    from pipeline.apps.sweeps import pick_dap

    random_arm = {"mean_sft_tokens": 50.0, "pass_at_1": 0.20}
    runs = [{"budgets": "loose", "mean_sft_tokens": 40.0, "pass_at_1": 0.30},   # cut 20%
            {"budgets": "tight", "mean_sft_tokens": 35.0, "pass_at_1": 0.195},  # 30%, -0.005
            {"budgets": "tightest", "mean_sft_tokens": 30.0, "pass_at_1": 0.25}]
    assert pick_dap(runs, random_arm) == {"budgets": "tight"}
    assert [round(r["token_cut"], 2) for r in runs] == [0.2, 0.3, 0.4]
    # More than 1 point below random fails the target however short the traces are.
    runs = [{"budgets": "tight", "mean_sft_tokens": 30.0, "pass_at_1": 0.18}]
    assert pick_dap(runs, random_arm) is None


def test_kd_sweep_picks_the_largest_margin_over_sft_never_the_ratio_0_control():
    from pipeline.apps.sweeps import pick_kd

    sft = {"pass_at_1": 0.20}
    runs = [{"kd_ratio": 0.0, "pass_at_1": 0.30},    # the control: never the pick
            {"kd_ratio": 0.25, "pass_at_1": 0.22},
            {"kd_ratio": 0.5, "pass_at_1": 0.25},    # +0.05: the pick,
            {"kd_ratio": 1.0, "pass_at_1": 0.25}]    # not this tie after it
    assert pick_kd(runs, sft) == {"kd_ratio": 0.5}
    assert [round(r["margin_vs_sft"], 3) for r in runs] == [0.1, 0.02, 0.05, 0.05]


def test_opd_sweep_picks_the_lr_with_the_largest_margin_over_its_sft_start():
    from pipeline.apps.sweeps import pick_opd

    sft = {"pass_at_1": 0.10}
    runs = [{"learning_rate": 3e-5, "pass_at_1": 0.09},
            {"learning_rate": 1e-4, "pass_at_1": 0.14},   # +0.04: the pick,
            {"learning_rate": 3e-4, "pass_at_1": 0.14}]   # not this tie after it
    assert pick_opd(runs, sft) == {"learning_rate": 1e-4}
    assert [round(r["margin_vs_sft"], 3) for r in runs] == [-0.01, 0.04, 0.04]
