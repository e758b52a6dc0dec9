"""The report: written from real Parquet versions, opened in headless Chromium (Debian package).

The versions are built here with the Store (the engines are tested by their own stages' tests);
the report only reads Parquet files and manifests.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.apps.report import SECTIONS, write_report
from pipeline.store import Store

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _commit(store: Store, stage: str, version: str, table: pa.Table | None, inputs: dict,
            stats: dict, splits: dict | None = None, drops: dict | None = None):
    tmp = store.begin(stage, version, clear=True)
    if table is not None:
        pq.write_table(table, os.path.join(tmp, "part-00000-000.parquet"))
    for split, t in (splits or {}).items():
        os.makedirs(os.path.join(tmp, split))
        pq.write_table(t, os.path.join(tmp, split, "part-00000-000.parquet"))
    schema = {n: str(table.schema.field(n).type) for n in table.column_names} if table else {}
    if splits:
        schema = {s: {n: str(t.schema.field(n).type) for n in t.column_names}
                  for s, t in splits.items()}
    store.commit(stage, version, {
        "stage": stage, "version": version, "inputs": inputs, "stats": stats,
        "drops": drops or {}, "rows_in": None, "splits": list(splits or []), "schema": schema,
        "rows_out": table.num_rows if table is not None else None,
        "finished_at": f"2026-11-23T08:00:0{len(inputs)}+00:00", "wall_s": 1.5,
        "code_version": "0.1.0+test"})


@pytest.fixture
def full_store(tmp_path) -> Store:
    """prompts -> verify -> prune -> sft -> redi -> evaluate, with realistic columns."""
    rng = random.Random(0)
    store = Store(str(tmp_path / "data"))
    _commit(store, "prompts", "p1", pa.table({"problem_id": ["a", "b"], "problem": ["x", "y"]}),
            {}, {"problems": 2})
    rows = []
    for pid in range(20):
        rate = rng.choice([0.0, 0.25, 0.5, 1.0])
        level = "easy" if rate >= 0.8 else "medium" if rate >= 0.3 else "hard"
        for s in range(4):
            rows.append({"problem_id": str(pid), "trace_id": f"{pid}-{s}",
                         "completion_tokens": rng.randint(20, 80), "correct": s < rate * 4,
                         "pass_rate": rate, "difficulty": level})
    verify = pa.Table.from_pylist(rows)
    _commit(store, "verify", "v1", verify, {"prompts": "p1"}, {"accuracy": 0.5})
    kept = [dict(r, pruned_tokens=r["completion_tokens"] // 2) for r in rows
            if r["completion_tokens"] < 70]
    _commit(store, "prune", "r1", pa.Table.from_pylist(kept), {"verify": "v1"}, {},
            drops={"over_budget": len(rows) - len(kept)})
    _commit(store, "sft", "s1", None, {"prune": "r1"},
            {"loss": [2.0, 1.5, 1.1, 0.9], "logged_steps": [1, 2, 3, 4], "epochs": 2})
    _commit(store, "redi", "d1", None, {"sft": "s1"},
            {"loss": [0.5, 0.45, 0.4], "chosen_logps": [-0.5, -0.45, -0.4],
             "rejected_logps": [-0.6, -0.8, -1.0], "alpha": 0.8})
    summary = pa.Table.from_pylist([
        {"model": m, "difficulty": d, "problems": 10, "samples": 40, "pass_at_1": p, "k": 4,
         "pass_at_k": min(1.0, p + 0.2), "mean_completion_tokens": 30.0,
         "truncated_share": 0.0, "model_path": f"/m/{m}"}
        for m, p in (("teacher", 0.8), ("student", 0.1), ("sft", 0.6), ("redi", 0.65))
        for d in ("all", "1", "2")])
    _commit(store, "evaluate", "e1", None, {"prompts": "p1", "sft": "s1", "redi": "d1"},
            {"models": {"teacher": "/m/teacher"}}, splits={"summary": summary})
    return store


def test_report_sections_from_versions(full_store, tmp_path):
    path = write_report(full_store, str(tmp_path / "out" / "report.html"))
    text = open(path, encoding="utf-8").read()
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in text
    # 1 lengths + 1 pass rate + 2 training + 1 evaluation figure; no provenance version.
    assert text.count("data:image/png;base64,") == 5
    assert "no provenance version" in text
    assert "over_budget" in text and "redi@d1" in text and "rejected_logps" in text
    assert "<td>evaluate@e1 (LATEST)</td>" in text
    assert re.search(r"<td>student</td><td>all</td>.*?0\.1<", text)


def test_report_draws_opds_learning_curve_per_iteration(full_store, tmp_path):
    _commit(full_store, "opd", "o1", None, {"sft": "s1"},
            {"pass_rate": [0.2, 0.3, 0.45], "mean_tokens": [40.0, 38.5, 36.0],
             "kl": [0.9, 0.6, 0.4], "loss": [0.1, 0.05, 0.02], "problems": 16})
    text = open(write_report(full_store, str(tmp_path / "r.html")), encoding="utf-8").read()
    training = text[text.index('<section id="training">'):text.index('<section id="evaluation">')]
    assert "opd@o1" in training and "pass_rate" in training and "mean_tokens" in training
    # sft, redi and opd each one figure; no kd version: no note for it (run by name only)
    assert training.count("data:image/png;base64,") == 3 and "no kd version" not in training


def test_report_on_an_empty_root(tmp_path):
    path = write_report(Store(str(tmp_path / "empty")), str(tmp_path / "r.html"))
    text = open(path, encoding="utf-8").read()
    assert "no complete version of any stage" in text and "data:image" not in text


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                    "(Debian: apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(full_store, tmp_path):
    """Chromium loads the file offline; a script appended for the test writes what it sees."""
    page = open(write_report(full_store, str(tmp_path / "report.html")), encoding="utf-8").read()
    probe = ("<script>window.addEventListener('load', () => {"
             "const imgs = [...document.images];"
             "const ok = imgs.filter(i => i.complete && i.naturalWidth > 100).length;"
             "const ids = [...document.querySelectorAll('section')].map(s => s.id"
             " + ':' + s.getBoundingClientRect().height.toFixed(0)).join(',');"
             "const d = document.createElement('pre'); d.id = 'probe';"
             "d.textContent = `images=${imgs.length} rendered=${ok} sections=${ids}`;"
             "document.body.appendChild(d); });</script>")
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", probe + "</body>"), encoding="utf-8")
    profile = tmp_path / "chromium-profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--no-first-run",
           f"--user-data-dir={profile}", "--virtual-time-budget=5000"]
    dom = subprocess.run(cmd + ["--dump-dom", probed.as_uri()], capture_output=True, text=True,
                         timeout=120)
    m = re.search(r'<pre id="probe">images=(\d+) rendered=(\d+) sections=([^<]*)</pre>',
                  dom.stdout)
    assert m, f"probe not found; chromium stderr: {dom.stderr[-2000:]}"
    assert int(m.group(1)) == 5 and int(m.group(2)) == 5
    heights = dict(s.split(":") for s in m.group(3).split(","))
    assert list(heights) == list(SECTIONS)
    assert all(int(h) > 20 for h in heights.values())  # every section laid out with content
    shot = tmp_path / "shot.png"
    subprocess.run(cmd + [f"--screenshot={shot}", "--window-size=1200,2000",
                          probed.as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000
