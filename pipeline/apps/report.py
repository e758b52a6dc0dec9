"""`distillery report` — one static HTML file about a data root; opens offline, no server.

Sections (each says so and moves on when its stage has no version yet):
  stages      per stage: versions, rows in -> out, drops by reason, wall time
  lengths     trace length histograms before / after prune, per difficulty level
  pass-rate   the per-problem pass-rate histogram from verify
  teachers    several teachers side by side (a verify version with >1 teacher): per teacher the
              pass rate by difficulty, trace length mean and sd, the provenance teacher-sentence
              share and the student's perplexity on its traces; `distillery compare-teachers`'
              table (<data_root>/compare_teachers.json)
  provenance  provenance score histogram, sentence label shares, selection counts, and the
              distilled-student analysis (attribution: teacher share in correct vs incorrect)
  training    sft loss and the REDI curves (every numeric series in the sft/redi manifests)
  evaluation  the evaluate table (pass@1, pass@k, mean tokens, per difficulty) and its chart
  ablations   `distillery demo --ablations`' table (<data_root>/ablations.json): per arm mean ±
              sd over seeds, the paired differences, each target met or missed
  lineage     every version of every stage and the versions it was made from

Charts are matplotlib PNGs embedded as base64 `data:` URIs: one self-contained file.
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
import os
import posixpath
import statistics

from pipeline.store import Store, Version

STAGE_ORDER = ("prompts", "generate", "verify", "prune", "provenance", "select", "sft", "redi",
               "distributions", "kd", "opd", "evaluate", "attribution")
SECTIONS = ("stages", "lengths", "pass-rate", "teachers", "provenance", "training", "evaluation",
            "ablations", "lineage")

CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#777;font-style:italic} figure{margin:1em 0} img{max-width:100%}
code{font-size:.9em;background:#f5f5f5;padding:0 .2em}
"""


def _esc(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _level_key(level) -> tuple:
    """easy < medium < hard, then anything else (numbers of operations, MATH levels) as text."""
    order = {"easy": 0, "medium": 1, "hard": 2}
    return (order.get(level, 3), str(level))


def _table(header: list[str], rows: list[list], num: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{_esc(c)}</td>' if i in num else f"<td>{_esc(c)}</td>"
        for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(fig, caption: str) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return (f'<figure><img alt="{_esc(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


def _input(store: Store, version: Version | None, stage: str) -> Version | None:
    """The version of `stage` that `version` was made from (not merely the newest one)."""
    if version is None:
        return None
    ref = (version.manifest.get("inputs") or {}).get(stage)
    return store.find(stage, ref) if ref else None


# --------------------------------------------------------------------------- sections

def _stages_section(store: Store, latest: dict[str, Version]) -> str:
    rows = []
    for stage in STAGE_ORDER:
        versions = store.versions(stage)
        v = latest.get(stage)
        if v is None:
            continue
        m = v.manifest
        drops = ", ".join(f"{k}: {n}" for k, n in sorted((m.get("drops") or {}).items())) or "-"
        rows.append([stage, len(versions), v.version, m.get("rows_in"),
                     json.dumps(m.get("rows_out")) if isinstance(m.get("rows_out"), dict)
                     else m.get("rows_out", "-"), drops, m.get("wall_s", "-")])
    if not rows:
        return _note(f"no complete version of any stage under {store.url}")
    return _table(["stage", "versions", "latest", "rows in", "rows out", "drops by reason",
                   "wall s"], rows, num={1, 3, 6})


def _lengths_section(store: Store, latest: dict[str, Version]) -> str:
    import matplotlib.pyplot as plt

    prune = latest.get("prune")
    verify = _input(store, prune, "verify") or latest.get("verify")
    if verify is None:
        return _note("no verify version yet: no trace lengths to show")
    before = verify.read_table(columns=["completion_tokens", "correct", "difficulty"]).to_pylist()
    after = (prune.read_table(columns=["pruned_tokens", "correct", "difficulty"]).to_pylist()
             if prune is not None else [])
    levels = sorted({r["difficulty"] for r in before if r["difficulty"] is not None},
                    key=_level_key) or [None]
    fig, axes = plt.subplots(1, len(levels), figsize=(4.2 * len(levels), 3), squeeze=False)
    rows = []
    for ax, level in zip(axes[0], levels):
        b = [r["completion_tokens"] for r in before if r["correct"] and r["difficulty"] == level]
        a = [r["pruned_tokens"] for r in after if r["correct"] and r["difficulty"] == level]
        top = max(b + a + [1])
        bins = [top * i / 20 for i in range(21)]
        ax.hist(b, bins=bins, alpha=0.55, label=f"before prune ({len(b)})")
        if prune is not None:
            ax.hist(a, bins=bins, alpha=0.55, label=f"after prune ({len(a)})")
        ax.set_title(f"difficulty: {level}")
        ax.set_xlabel("completion tokens")
        ax.legend(fontsize=7)
        rows.append([level, len(b), round(sum(b) / len(b), 1) if b else "-",
                     len(a) if prune is not None else "-",
                     round(sum(a) / len(a), 1) if a else "-"])
    axes[0][0].set_ylabel("correct traces")
    out = _figure(fig, "Correct trace lengths before and after prune, per difficulty level")
    out += _table(["difficulty", "correct before", "mean tokens before", "kept after",
                   "mean tokens after"], rows, num={1, 2, 3, 4})
    if prune is None:
        out += _note("no prune version yet: only the lengths before pruning are shown")
    return out


def _pass_rate_section(store: Store, latest: dict[str, Version]) -> str:
    import matplotlib.pyplot as plt

    verify = _input(store, latest.get("prune"), "verify") or latest.get("verify")
    if verify is None:
        return _note("no verify version yet")
    t = verify.read_table(columns=["problem_id", "pass_rate", "difficulty"]).to_pylist()
    per_problem = {r["problem_id"]: r for r in t}
    rates = [r["pass_rate"] for r in per_problem.values() if r["pass_rate"] is not None]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(rates, bins=[i / 10 for i in range(11)], edgecolor="white")
    ax.set_xlabel("teacher pass rate per problem")
    ax.set_ylabel("problems")
    counts: dict = {}
    for r in per_problem.values():
        counts[r["difficulty"]] = counts.get(r["difficulty"], 0) + 1
    return (_figure(fig, f"Pass-rate histogram over {len(rates)} problems ({verify.ref()})")
            + _table(["difficulty", "problems"], [[k, n] for k, n in sorted(
                counts.items(), key=lambda kv: _level_key(kv[0]))], num={1}))


def _mean_sd(values: list) -> tuple:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def teacher_stats(verify_rows: list[dict], provenance_rows: list[dict] | None = None) -> dict:
    """Per teacher, the statistics of "Not All Correct Answers Are Equal" (arXiv 2505.14464).

    verify_rows: teacher, correct, difficulty, completion_tokens. provenance_rows (optional):
    teacher, teacher_share, lp_student. Returns {teacher: {traces, pass_rate, by_level
    {level: [correct, traces]}, tokens [mean, sd], correct_tokens [mean, sd], teacher_share,
    student_ppl, scored}}. student_ppl = exp(-mean lp_student): lp_student is the mean token
    log-prob of one trace under the student, so this is the per-trace mean weighted equally
    per trace (not per token); null where provenance did not score (method none).
    """
    out: dict = {}
    for r in verify_rows:
        t = out.setdefault(r["teacher"], {"traces": 0, "correct": 0, "by_level": {},
                                          "_tokens": [], "_correct_tokens": []})
        t["traces"] += 1
        ok = r["correct"] is True
        t["correct"] += ok
        level = t["by_level"].setdefault(r["difficulty"], [0, 0])
        level[0] += ok
        level[1] += 1
        t["_tokens"].append(r["completion_tokens"])
        if ok:
            t["_correct_tokens"].append(r["completion_tokens"])
    for name, t in out.items():
        t["pass_rate"] = t["correct"] / t["traces"]
        t["tokens"] = list(_mean_sd(t.pop("_tokens")))
        t["correct_tokens"] = list(_mean_sd(t.pop("_correct_tokens")))
        mine = [r for r in provenance_rows or [] if r["teacher"] == name]
        shares = [r["teacher_share"] for r in mine if r["teacher_share"] is not None]
        lps = [r["lp_student"] for r in mine if r["lp_student"] is not None]
        t["teacher_share"] = sum(shares) / len(shares) if shares else None
        t["student_ppl"] = math.exp(-sum(lps) / len(lps)) if lps else None
        t["scored"] = len(lps)
    return out


def _teachers_section(store: Store, latest: dict[str, Version]) -> str:
    prov = latest.get("provenance")
    verify = (_input(store, _input(store, prov, "prune"), "verify")
              or _input(store, latest.get("prune"), "verify") or latest.get("verify"))
    out = ""
    names = []
    if verify is not None and "teacher" in (verify.manifest.get("schema") or {}):
        rows = verify.read_table(columns=["teacher", "correct", "difficulty",
                                          "completion_tokens"]).to_pylist()
        names = sorted({r["teacher"] for r in rows})
    if len(names) < 2:
        out += _note(f"{verify.ref() if verify else 'no verify version'}: "
                     f"{len(names)} teacher(s); the side-by-side needs traces of several "
                     "(generate.teachers, or an imported file with a teacher per row)")
    else:
        prov_rows = None
        made_from = _input(store, _input(store, prov, "prune"), "verify")
        if made_from is not None and made_from.version == verify.version:
            prov_rows = prov.read_table(columns=["teacher", "teacher_share",
                                                 "lp_student"]).to_pylist()
        stats = teacher_stats(rows, prov_rows)
        levels = sorted({lv for t in stats.values() for lv in t["by_level"]}, key=_level_key)
        table = []
        for name in names:
            t = stats[name]
            table.append([name, t["traces"], f"{t['pass_rate']:.3f}"]
                         + [(f"{t['by_level'][lv][0] / t['by_level'][lv][1]:.3f}"
                             if lv in t["by_level"] else "-") for lv in levels]
                         + [mean_sd_text(t["tokens"], 1), mean_sd_text(t["correct_tokens"], 1),
                            t["teacher_share"], t["student_ppl"]])
        out += (_note(f"{verify.ref()}" + (f", {prov.ref()}" if prov_rows is not None else
                                           ": no provenance version scored these traces")
                      + "; tokens: mean ± sd (the spread is the length diversity); student "
                      "perplexity = exp(-mean over traces of the student's mean token log-prob)")
                + _table(["teacher", "traces", "pass rate"]
                         + [f"pass rate, {lv}" for lv in levels]
                         + ["tokens", "correct traces' tokens", "teacher-sentence share",
                            "student perplexity"], table,
                         num=set(range(1, 3 + len(levels) + 4))))
    path = posixpath.join(store.root, "compare_teachers.json")
    if store.fs.exists(path):
        with store.fs.open(path, "r") as f:
            result = json.load(f)
        out += (_note(f"distillery compare-teachers: seeds {result['seeds']}, "
                      f"{result['sft_rows_per_teacher']} SFT rows per teacher, pick: "
                      f"{result['pick']}; pass@1 mean ± sample sd over seeds")
                + _table(["teacher", "pass@1", "SFT trace tokens", "student's own tokens"],
                         [[t, mean_sd_text(r["pass_at_1"]), r["mean_sft_tokens"],
                           mean_sd_text(r["mean_completion_tokens"], 1)]
                          for t, r in result["teachers"].items()]))
    return out


def _provenance_section(store: Store, latest: dict[str, Version]) -> str:
    import matplotlib.pyplot as plt

    v = latest.get("provenance")
    if v is None:
        return _note("no provenance version in this data root") + _attribution(latest)
    names = set(v.manifest.get("schema") or {})
    cols = [c for c in ("provenance_score", "sentence_labels", "selected") if c in names]
    t = v.read_table(columns=cols).to_pylist()
    out = ""
    if "provenance_score" in cols:
        scores = [r["provenance_score"] for r in t if r["provenance_score"] is not None]
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.hist(scores, bins=30)
        ax.set_xlabel("provenance score (mean lp_teacher - lp_student, nats/token)")
        ax.set_ylabel("traces")
        out += _figure(fig, f"Provenance scores of {len(scores)} traces")
    if "sentence_labels" in cols:
        shares: dict = {}
        for r in t:
            for label in r["sentence_labels"] or []:
                shares[label] = shares.get(label, 0) + 1
        total = sum(shares.values()) or 1
        out += _table(["sentence label", "sentences", "share"],
                      [[k, n, f"{n / total:.1%}"] for k, n in sorted(shares.items())], num={1, 2})
    if "selected" in cols:
        chosen = sum(bool(r["selected"]) for r in t)
        reasons = (v.manifest.get("stats") or {}).get("select_reasons") or {}
        out += _note(f"selected: {chosen} of {len(t)} traces"
                     + (f" ({', '.join(f'{k}: {n}' for k, n in sorted(reasons.items()))})"
                        if reasons else ""))
    out += _attribution(latest)
    return out or _note(f"{v.ref()} has none of the columns this section shows")


def _attribution(latest: dict[str, Version]) -> str:
    """The distilled student's own answers (stages/attribution.py): the paper's analysis —
    teacher-originated sentences in correct vs incorrect answers, and the four classes."""
    a = latest.get("attribution")
    if a is None:
        return ""
    st = a.manifest.get("stats") or {}
    rows = [[group, st[group]["answers"], st[group]["sentences"],
             st[group]["teacher_share_pooled"], st[group]["teacher_share_mean"]]
            + [st[group]["classes"][c] for c in ("shared", "teacher", "student", "boosted")]
            for group in ("correct", "incorrect", "all") if group in st]
    return (_note(f"{a.ref()}: sentences of {st.get('distilled')}'s own answers, labelled under "
                  f"teacher, original student and {st.get('distilled')}")
            + _table(["answers", "n", "sentences", "teacher share (pooled)",
                      "teacher share (mean per answer)", "shared", "teacher", "student",
                      "boosted"], rows, num={1, 2, 3, 4, 5, 6, 7, 8}))


def _series(stats: dict) -> dict[str, list[float]]:
    """Every numeric list in a manifest's stats (loss, log-prob curves, learning rate ...)."""
    return {k: v for k, v in (stats or {}).items() if isinstance(v, list) and len(v) > 1
            and k != "logged_steps"  # the x axis of the others, not a curve
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)}


def _training_section(store: Store, latest: dict[str, Version]) -> str:
    import matplotlib.pyplot as plt

    out = ""
    for stage in ("sft", "redi", "kd", "opd"):
        v = latest.get(stage)
        if v is None:
            if stage in ("sft", "redi"):  # kd and opd are run by name only
                out += _note(f"no {stage} version yet")
            continue
        series = _series(v.manifest.get("stats"))
        steps = (v.manifest.get("stats") or {}).get("logged_steps") or []
        scalars = [[k, x] for k, x in sorted((v.manifest.get("stats") or {}).items())
                   if isinstance(x, (int, float, str)) and not isinstance(x, bool)]
        if series:
            # Log-probs share one panel (a collapse shows as both falling together); loss
            # and the rest get their own.
            # Length-normalized and summed log-probs are on different scales: two panels.
            logp = {k: s for k, s in series.items() if "logp" in k and not k.endswith("_sum")}
            logp_sum = {k: s for k, s in series.items() if "logp" in k and k.endswith("_sum")}
            other = {k: s for k, s in series.items() if "logp" not in k}
            panels = [(k, {k: s}) for k, s in other.items()] + [
                (title, group) for title, group in (("log-probs per token", logp),
                                                    ("log-probs summed", logp_sum)) if group]
            fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3),
                                     squeeze=False)
            for ax, (title, curves) in zip(axes[0], panels):
                for name, s in curves.items():
                    xs = steps if len(steps) == len(s) else range(1, len(s) + 1)
                    ax.plot(xs, s, label=name)
                ax.set_title(title)
                # opd's lists are one point per iteration (pass rate, length, kl, loss)
                ax.set_xlabel("iteration" if stage == "opd" else
                              "optimizer step" if len(steps) else "logging step")
                if len(curves) > 1:
                    ax.legend(fontsize=7)
            out += f"<h3>{_esc(v.ref())}</h3>" + _figure(
                fig, f"{stage}: " + ", ".join(series))
        else:
            out += f"<h3>{_esc(v.ref())}</h3>" + _note("no curves recorded in its manifest")
        if scalars:
            out += _table(["statistic", "value"], scalars)
    return out


def _evaluation_section(store: Store, latest: dict[str, Version]) -> str:
    import matplotlib.pyplot as plt

    v = latest.get("evaluate")
    if v is None:
        return _note("no evaluate version yet")
    summary = v.read_table("summary").to_pylist()
    k = summary[0]["k"] if summary else 1
    rows = [[r["model"], r["difficulty"], r["problems"], r["samples"], r["pass_at_1"],
             r["pass_at_k"], r["mean_completion_tokens"], r["truncated_share"]] for r in summary]
    overall = [r for r in summary if r["difficulty"] == "all"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3))
    names = [r["model"] for r in overall]
    a1.bar(names, [r["pass_at_1"] for r in overall], color="#4c72b0")
    a1.set_ylim(0, 1)
    a1.set_title("pass@1 (held-out)")
    a2.bar(names, [r["mean_completion_tokens"] for r in overall], color="#dd8452")
    a2.set_title("mean completion tokens")
    paths = v.manifest.get("stats", {}).get("models", {})
    return (_figure(fig, f"Evaluation ({v.ref()})")
            + _table(["model", "difficulty", "problems", "samples", "pass@1", f"pass@{k}",
                      "mean tokens", "truncated"], rows, num={2, 3, 4, 5, 6, 7})
            + _table(["model", "checkpoint"], [[n, p] for n, p in paths.items()]))


def mean_sd_text(pair, digits: int = 3) -> str:
    """"0.512 ± 0.013" (mean ± sd), "0.512" with one seed, "-" with none."""
    mean, sd = pair
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def _ablations_section(store: Store) -> str:
    path = posixpath.join(store.root, "ablations.json")
    if not store.fs.exists(path):
        return _note("no ablations run under this data root (`distillery demo --ablations`)")
    with store.fs.open(path, "r") as f:
        result = json.load(f)
    summary, k = result["summary"], result["k"]
    arms = [[arm] + [mean_sd_text(row[m], d) for m, d in (
        ("pass_at_1", 3), ("pass_at_k", 3), ("mean_completion_tokens", 1), ("sft_rows", 0),
        ("mean_sft_tokens", 1))] + [row["seeds"]] for arm, row in summary["arms"].items()]
    diffs = [[c["name"]] + [mean_sd_text(c[m], d) for m, d in (
        ("pass_at_1", 3), ("pass_at_k", 3), ("mean_completion_tokens", 1),
        ("mean_sft_tokens", 1))] + [json.dumps(c["per_seed"]["pass_at_1"])]
        for c in summary["comparisons"]]
    state = "" if result.get("complete", True) else (
        f" — INCOMPLETE: {len(result['seeds'])} of the planned seeds {result['planned_seeds']}")
    return (_note(f"seeds {result['seeds']}, finished {result['finished_at']} UTC, "
                  f"{result['wall_s']:.0f} s; mean ± sample sd over seeds{state}")
            + _table(["arm", "pass@1", f"pass@{k}", "own tokens", "SFT rows", "SFT tokens",
                      "seeds"], arms)
            + _table(["paired difference (arm - baseline)", "pass@1", f"pass@{k}",
                      "own tokens", "SFT tokens", "pass@1 per seed"], diffs)
            + "<ul>" + "".join(f"<li>{_esc(t)}</li>" for t in result["targets"]) + "</ul>")


def _lineage_section(store: Store) -> str:
    rows = []
    for stage in STAGE_ORDER:
        latest = store.latest(stage)
        for v in store.versions(stage):
            inputs = ", ".join(f"{s}@{x}" for s, x in (v.manifest.get("inputs") or {}).items())
            mark = " (LATEST)" if latest is not None and latest.version == v.version else ""
            rows.append([v.ref() + mark, inputs or "-", json.dumps(v.manifest.get("rows_out")),
                         v.manifest.get("code_version", "-"), v.manifest.get("finished_at", "-")])
    if not rows:
        return _note("no versions")
    return _table(["version", "made from", "rows out", "code", "finished"], rows)


def write_report(store: Store, out: str) -> str:
    """Write the report of every stage under `store` to `out`; return its absolute path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    latest = {s: v for s in STAGE_ORDER if (v := store.latest(s)) is not None}
    body = {
        "stages": ("Stages: counts and drops", _stages_section(store, latest)),
        "lengths": ("Trace lengths before / after prune", _lengths_section(store, latest)),
        "pass-rate": ("Teacher pass rate", _pass_rate_section(store, latest)),
        "teachers": ("Teachers side by side", _teachers_section(store, latest)),
        "provenance": ("Provenance", _provenance_section(store, latest)),
        "training": ("Training curves", _training_section(store, latest)),
        "evaluation": ("Evaluation", _evaluation_section(store, latest)),
        "ablations": ("Ablations", _ablations_section(store)),
        "lineage": ("Lineage of every version", _lineage_section(store)),
    }
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f'<section id="{sid}"><h2>{_esc(title)}</h2>{content}</section>'
             for sid, (title, content) in body.items()]
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Distillery report</title><style>{CSS}</style></head><body>"
            f"<h1>Distillery report</h1><p>data root <code>{_esc(store.url)}</code>, "
            f"written {now}</p>" + "".join(parts) + "</body></html>")
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(page)
    return out
