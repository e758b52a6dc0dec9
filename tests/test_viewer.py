"""`distillery view` on a real store, driven in headless Chromium over the DevTools protocol.

The store is built by the real stages on the tiny model (prompts from a file that carries an XSS
problem -> generate on vLLM -> verify -> prune -> provenance (tiny teacher and student) -> select
-> evaluate on vLLM). sft and redi are the tiny model committed as model versions, as
tests/test_evaluate.py does (training is tested in its own modules). A random model cannot write
markup into a completion, so one extra version, provenance@xss0test, is the real provenance
version with one row's completion replaced by script/img markup (LATEST stays on the real one).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.store import Store

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                    "(Debian: apt-get install -y chromium)")
XSS_PROBLEM = 'Compute 1 + 1. <script>window.__xss=1</script><img src=x onerror="window.__xss=1">'
XSS_COMPLETION = ('<think>\nFirst <script>window.__xss=1</script>. Then '
                  '<img src=x onerror="window.__xss=1">.\n</think>\nSo \\boxed{2}')


def _commit(store: Store, stage: str, version: str, table: pa.Table, inputs: dict) -> None:
    tmp = store.begin(stage, version, clear=True)
    pq.write_table(table, os.path.join(tmp, "part-00000.parquet"))
    store.commit(stage, version, {
        "stage": stage, "version": version, "inputs": inputs, "output": "dataset", "splits": [],
        "rows_in": table.num_rows, "rows_out": table.num_rows, "drops": {}, "stats": {},
        "schema": {n: str(table.schema.field(n).type) for n in table.column_names},
        "finished_at": "2026-11-23T21:00:00+00:00", "wall_s": 0.1, "code_version": "test"})


def xss_version(store: Store, prov) -> str:
    """provenance@xss0test: the real provenance rows, the first one's text replaced by markup."""
    rows = prov.read_table().to_pylist()
    cut = XSS_COMPLETION.index(". Then") + 1
    rows[0].update(completion=XSS_COMPLETION, pruned_completion=XSS_COMPLETION,
                   sentence_spans=[[0, cut], [cut + 1, len(XSS_COMPLETION)]],
                   sentence_labels=["teacher", "student"], sentence_p_teacher=[0.9, 0.2],
                   sentence_p_student=[0.1, 0.7])
    _commit(store, "provenance", "xss0test", pa.Table.from_pylist(rows), {"prune": prov.manifest["inputs"]["prune"]})
    store.set_latest("provenance", prov.version)
    return "xss0test"


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_cluster, tiny_model) -> dict:
    from pipeline.config import load_recipe
    from pipeline.runner import run_stage
    from stages import STAGES
    from test_evaluate import _model_version

    tmp = tmp_path_factory.mktemp("viewer")
    data_root = str(tmp / "data")
    problems = [{"problem": f"Compute {a} + {b}.", "answer": str(a + b)}
                for a, b in ((2, 3), (4, 4), (7, 1), (9, 5), (6, 6), (3, 8), (5, 2))]
    problems.append({"problem": XSS_PROBLEM, "answer": "2"})
    prompts_file = tmp / "problems.jsonl"
    prompts_file.write_text("".join(json.dumps(p) + "\n" for p in problems))
    recipe = load_recipe("configs/tiny.yaml", [
        f"data_root={data_root}", f"teacher={tiny_model}", f"prompts.path={prompts_file}",
        f"student={tiny_model}", "generate.n=2", "generate.max_tokens=16", "generate.shard_size=4",
        "evaluate.models=[teacher, sft]", "evaluate.synthetic_n=3", "evaluate.samples=2",
        "evaluate.pass_k=1", "evaluate.max_tokens=12"], STAGES)
    quiet = dict(log=lambda *_: None)
    out = {name: run_stage(name, recipe, **quiet)
           for name in ("prompts", "generate", "verify", "prune", "provenance", "select")}
    store = Store(data_root)
    out["xss"] = store.get("provenance", xss_version(store, out["provenance"]))
    _model_version(data_root, "sft", tiny_model)
    _model_version(data_root, "redi", tiny_model)
    out["evaluate"] = run_stage("evaluate", recipe, **quiet)
    # A running generate (a temp folder with two finished shards) and a half-written verify.
    running = store.tmp_dir("generate", "run0test")
    os.makedirs(running)
    for part in out["generate"].parquet_files()[:2]:
        shutil.copy(part, running)
    os.makedirs(store.version_dir("verify", "half0test"))
    return {"root": data_root, "store": store, **out}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(built):
    import uvicorn

    from pipeline.apps.viewer.server import Viewer, make_app
    from stages import STAGES

    port = _free_port()
    app = make_app(Viewer(built["store"], list(STAGES)))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "the viewer did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


class Chromium:
    """Headless Debian Chromium driven over the DevTools protocol (one page, JS evaluation)."""

    def __init__(self, profile: str):
        from websockets.sync.client import connect

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = os.path.join(profile, "DevToolsActivePort")
        deadline = time.time() + 60
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            assert time.time() < deadline and self.proc.poll() is None, "chromium did not start"
            time.sleep(0.1)
        port = int(open(port_file).read().split()[0])
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json()
                 if t["type"] == "page"]
        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return msg["result"]

    def js(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                        awaitPromise=True)
        assert "exceptionDetails" not in res, res["exceptionDetails"]
        return res["result"].get("value")

    def wait(self, expression: str, timeout: float = 20):
        deadline = time.time() + timeout
        while True:
            value = self.js(f"(() => {{ const v = ({expression}); return v instanceof Node ? true : v; }})()")
            if value:
                return value
            assert time.time() < deadline, f"timed out waiting for: {expression}"
            time.sleep(0.05)

    def open(self, url: str, ready: str):
        """Go to url, wait until `ready` (a JS expression) is true on the rendered page."""
        self.js("document.body && delete document.body.dataset.ready")
        self.call("Page.navigate", url=url)
        self.wait("document.body && document.body.dataset.ready && " + ready)

    def act(self, action: str, ready: str):
        """Run `action` (JS that changes the route), wait for the NEW page's render and `ready`."""
        before = self.js("document.body.dataset.ready || ''")
        self.js(action)
        self.wait(f"document.body.dataset.ready && document.body.dataset.ready !== '{before}' && "
                  + ready)

    def close(self):
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Chromium(str(tmp_path_factory.mktemp("chromium-profile")))
    yield b
    b.close()


ROWS_READY = ("document.querySelector('#rows-table, #rows p') && "
              "!document.querySelector('#count').textContent.startsWith('counting')")


def _count(browser) -> int:
    return int(browser.js("document.querySelector('#count').textContent").split()[0])


def _column(browser, name: str) -> list[str]:
    return browser.js(f"""(() => {{
        const t = document.querySelector('#rows-table'); if (!t) return [];
        const heads = [...t.rows[0].cells].map(c => c.textContent.replace(/ [▲▼]$/, ''));
        const i = heads.indexOf({json.dumps(name)});
        return [...t.rows].slice(1).map(r => r.cells[i].textContent); }})()""")


# ------------------------------------------------------------------------------ HTTP level

def test_http_reads_only_plain_names_and_versions_that_exist(built, server):
    c = httpx.Client(base_url=server)
    gen = built["generate"].version
    assert c.get(f"/api/rows/generate/{gen}").status_code == 200
    # Traversal and absolute paths, as raw request targets (a client would normalise them).
    for target in ("/api/rows/generate/..", "/api/rows/..%2F..%2Fetc/passwd",
                   "/api/rows/%2Fetc/passwd", "/api/rows/generate/..%2F" + gen,
                   "/api/sql/..?q=select%201", "/static/..%2F..%2Fstore.py",
                   "/static/../server.py"):
        status, body = _raw_get(server, target)
        assert status in (400, 404), (target, status, body)
        assert "root:" not in body and "import" not in body
    assert c.get("/api/rows/generate/%2E%2E").status_code == 400
    # Read only: no method but GET/HEAD.
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert c.request(method, "/api/runs").status_code == 405
    # Missing, half-written and running versions: messages, never a 500.
    r = c.get("/api/rows/verify/half0test")
    assert r.status_code == 409 and "half-written" in r.json()["error"]
    assert c.get("/api/rows/verify/nope0").status_code == 404
    running = c.get("/api/rows/generate/run0test?limit=200").json()
    assert len(running["rows"]) == sum(pq.read_metadata(p).num_rows
                                       for p in built["generate"].parquet_files()[:2])
    runs = {s["stage"]: s for s in c.get("/api/runs").json()["stages"]}
    # 8 problems / 4 per shard = 2 shards, 2 written.
    assert runs["generate"]["running"] == [{"version": "run0test", "shards": 2, "of": 2}]
    assert runs["verify"]["incomplete"] == ["half0test"]


def test_a_version_that_vanishes_is_an_answer_not_a_500(built, server):
    c = httpx.Client(base_url=server)
    store, verify = built["store"], built["verify"]
    for name in ("gone0test", "parts0test"):
        _commit(store, "verify", name, verify.read_table(), {"generate": built["generate"].version})
    store.set_latest("verify", verify.version)
    for name in ("gone0test", "parts0test"):      # opened (and cached) while complete
        assert c.get(f"/api/rows/verify/{name}").status_code == 200
    shutil.rmtree(store.version_dir("verify", "gone0test"))
    for part in store.get("verify", "parts0test").parquet_files():
        os.remove(part)
    r = c.get("/api/rows/verify/gone0test")
    assert r.status_code == 404 and "no such version" in r.json()["error"]
    r = c.get("/api/count/verify/parts0test")
    assert r.status_code == 410 and "Parquet parts are gone" in r.json()["error"]
    shutil.rmtree(store.version_dir("verify", "parts0test"))


def _raw_get(base: str, target: str) -> tuple[int, str]:
    host, port = base.rsplit("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.decode("utf-8", "replace").partition("\r\n\r\n")
    return int(head.split()[1]), body


def test_sql_box_is_one_select_over_this_version_only(built, server, tmp_path):
    c = httpx.Client(base_url=server)
    v = built["verify"]
    url = f"/api/sql/verify/{v.version}"
    ok = c.get(url, params={"q": "SELECT count(*) AS n, sum(correct::int) AS c FROM data"}).json()
    table = v.read_table(columns=["correct"]).column("correct").to_pylist()
    assert ok["rows"] == [[len(table), sum(bool(x) for x in table)]]
    secret = tmp_path / "secret.parquet"
    pq.write_table(pa.table({"s": ["leak"]}), secret)
    refused = {
        "read_parquet('/etc/passwd')": "SELECT * FROM read_parquet('/etc/passwd')",
        "read_csv": "SELECT * FROM read_csv('/etc/passwd')",
        "another parquet": f"SELECT * FROM read_parquet('{secret}')",
        "a glob": "SELECT * FROM glob('/etc/*')",
        "COPY": f"COPY (SELECT * FROM data) TO '{tmp_path / 'out.csv'}'",
        "ATTACH": f"ATTACH '{tmp_path / 'x.db'}'",
        "INSTALL": "INSTALL httpfs",
        "LOAD": "LOAD httpfs",
        "two statements": "SELECT 1; SELECT 2",
        "CREATE": "CREATE TABLE t AS SELECT 1",
        "SET": "SET enable_external_access=true",
        "DELETE-ish": "DROP VIEW data",
    }
    for what, sql in refused.items():
        r = c.get(url, params={"q": sql})
        assert r.status_code == 400, (what, r.status_code, r.text)
        assert "leak" not in r.text and "root:" not in r.text
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "x.db").exists()
    # The view still works after the attempts (DROP VIEW refused), and a row limit applies.
    big = c.get(url, params={"q": "SELECT * FROM range(5000)"}).json()
    assert big["truncated"] and len(big["rows"]) == big["row_limit"] == 1000
    assert c.get(url, params={"q": "SELECT count(*) FROM data"}).json()["rows"] == [[len(table)]]


def test_sql_box_time_limit_interrupts(built):
    from pipeline.apps.viewer.server import Viewer, ViewError, ViewerLimits

    viewer = Viewer(built["store"], [], ViewerLimits(sql_seconds=0.5))
    src = viewer.source("verify", built["verify"].version, None)
    started = time.time()
    with pytest.raises(ViewError) as e:
        viewer.sql(src, "SELECT count(*) FROM range(1000000000000) a, range(1000) b")
    assert e.value.status == 408 and time.time() - started < 10


def test_filters_search_sort_and_histograms_match_the_data(built, server):
    c = httpx.Client(base_url=server)
    v = built["verify"]
    rows = v.read_table().to_pylist()
    base = f"/api/count/verify/{v.version}"
    for value in ("true", "false"):
        want = sum(r["correct"] is (value == "true") for r in rows)
        assert c.get(base, params={"f": f"correct:{value}"}).json()["total"] == want
    level = rows[0]["difficulty"]
    assert c.get(base, params=[("f", f"difficulty:{level}"), ("f", "correct:false")]).json()[
        "total"] == sum(r["difficulty"] == level and r["correct"] is False for r in rows)
    # Search is a case-insensitive substring of the problem or the completion; % is literal.
    assert c.get(base, params={"q": "COMPUTE 7 + 1"}).json()["total"] == 2
    assert c.get(base, params={"q": "%"}).json()["total"] == sum(
        "%" in r["problem"] or "%" in r["completion"] for r in rows)
    page = c.get(f"/api/rows/verify/{v.version}",
                 params={"sort": "completion_tokens", "desc": "1", "limit": 5,
                         "cols": "trace_id,completion_tokens"}).json()
    assert [r[1] for r in page["rows"]] == sorted((r["completion_tokens"] for r in rows),
                                                 reverse=True)[:5]
    hist = c.get(f"/api/hist/verify/{v.version}/completion_tokens").json()["bins"]
    assert sum(b["count"] for b in hist) == len(rows)
    last = hist[-1]
    assert c.get(base, params={"r": f"completion_tokens:{last['lo']}:{last['hi']}",
                               "closed": "completion_tokens"}).json()["total"] == last["count"]
    assert c.get(base, params={"f": "pass_rate:1"}).status_code == 400       # not a filter column


# ------------------------------------------------------------------------------ the browser

@needs_chromium
def test_runs_page_lists_stages_versions_lineage_and_progress(built, server, browser):
    browser.open(server + "/#/", "document.querySelector('#runs')")
    stages = browser.js("[...document.querySelectorAll('#runs h2')].map(h => h.textContent)")
    for name in ("prompts", "generate", "verify", "prune", "provenance", "select", "sft", "redi",
                 "evaluate"):
        assert name in stages
    assert browser.js("document.querySelectorAll('#runs .latest').length") == 9  # one per stage
    v = built["verify"]
    cells = browser.js(f"[...document.querySelector('tr[data-version=\"{v.version}\"]').cells]"
                       ".map(c => c.textContent)")
    assert cells[3] == str(v.manifest["rows_in"]) and cells[4] == str(v.rows)
    assert "running: 2 of 2 shards" in browser.js("document.body.textContent")
    assert "half-written" in browser.js("document.body.textContent")
    tree = browser.js("document.querySelector('#lineage').textContent")
    assert f"evaluate@{built['evaluate'].version}" in tree and f"select@{built['select'].version}" in tree
    assert f"prompts@{built['prompts'].version}" in tree


@needs_chromium
def test_filter_search_histogram_and_sql_box_in_the_browser(built, server, browser):
    v = built["verify"]
    rows = v.read_table().to_pylist()
    browser.open(f"{server}/#/v/verify/{v.version}",
                 ROWS_READY + " && document.querySelector('#filter-correct')")
    assert _count(browser) == len(rows)
    # A filter: pick correct = false in its menu.
    browser.act("(() => { const s = document.querySelector('#filter-correct');"
                " s.value = 'false'; s.dispatchEvent(new Event('change')); })()", ROWS_READY)
    assert "correct%3Afalse" in browser.js("location.hash")
    assert _count(browser) == sum(r["correct"] is False for r in rows)
    assert set(_column(browser, "correct")) <= {"false"}
    # A search, typed and submitted.
    browser.act("document.querySelector('#search').value = 'compute 9 + 5';"
                "document.querySelector('#search-go').click()", ROWS_READY)
    assert "q=compute" in browser.js("location.hash")
    want = sum(r["correct"] is False and "compute 9 + 5" in r["problem"].lower() for r in rows)
    assert _count(browser) == want
    # Clear, then click the first bar of the completion-token histogram.
    browser.open(f"{server}/#/v/verify/{v.version}",
                 ROWS_READY + " && document.querySelector('#hist-completion_tokens .bar')")
    first = browser.js("+document.querySelector('#hist-completion_tokens .bar').dataset.count")
    browser.act("document.querySelector('#hist-completion_tokens .bar').click()", ROWS_READY)
    assert "r=completion_tokens" in browser.js("location.hash")
    assert _count(browser) == first > 0
    # The SQL box.
    browser.js("document.querySelector('#sql-input').value = "
               "'SELECT difficulty, count(*) AS n FROM data GROUP BY difficulty ORDER BY difficulty';"
               "document.querySelector('#sql-run').click()")
    browser.wait("document.querySelector('#sql-table')")
    got = browser.js("[...document.querySelector('#sql-table').rows].slice(1)"
                     ".map(r => [r.cells[0].textContent, +r.cells[1].textContent])")
    levels = sorted({r["difficulty"] for r in rows})
    assert got == [[lv, sum(r["difficulty"] == lv for r in rows)] for lv in levels]
    browser.js("document.querySelector('#sql-input').value = \"SELECT * FROM read_csv('/etc/passwd')\";"
               "document.querySelector('#sql-run').click()")
    assert "Permission" in browser.wait("document.querySelector('#sql-result .error')?.textContent")


@needs_chromium
def test_problem_page_samples_prune_and_provenance(built, server, browser):
    prov = built["provenance"]
    rows = prov.read_table().to_pylist()
    pid = rows[1]["problem_id"]
    mine = [r for r in rows if r["problem_id"] == pid]
    browser.open(f"{server}/#/p/provenance/{prov.version}/{pid}",
                 "document.querySelector('#samples')")
    assert browser.js("document.querySelector('#problem-text').textContent") == mine[0]["problem"]
    cards = browser.js("[...document.querySelectorAll('#samples .sample')].map(c => ["
                       "c.dataset.trace, c.querySelector('.pred').textContent,"
                       " c.querySelector('.verdict').textContent])")
    assert len(cards) == len(mine) == 2
    for card, r in zip(cards, sorted(mine, key=lambda r: r["sample_idx"])):
        assert card[0] == r["trace_id"]
        assert card[1] == (r["pred_answer"] if r["pred_answer"] is not None else "∅")
        assert card[2] == {True: "correct", False: "wrong", None: "unverified"}[r["correct"]]
    # Side by side: the cards sit on one row of the grid.
    tops = browser.js("[...document.querySelectorAll('#samples .sample')]"
                      ".map(c => Math.round(c.getBoundingClientRect().top))")
    assert len(set(tops)) == 1
    first = sorted(mine, key=lambda r: r["sample_idx"])[0]
    sentences = _sentences_of(browser, 0)
    assert [s[0] for s in sentences] == [
        lb if lb in ("teacher", "student", "common", "shared", "boosted", "unscored") else "common"
        for lb in first["sentence_labels"]]
    assert [s[1] for s in sentences] == [first["pruned_completion"][a:b]
                                         for a, b in first["sentence_spans"]]
    for (label, _, title, _), p_t, p_s in zip(sentences, first["sentence_p_teacher"],
                                              first["sentence_p_student"]):
        shown = re.fullmatch(r"(\w+): p_T=(\S+) p_S=(\S+)", title)
        assert shown and shown[1] in first["sentence_labels"]
        for text, want in ((shown[2], p_t), (shown[3], p_s)):
            assert (text == "∅" if want is None else float(text) == pytest.approx(want, abs=1e-4))
    # The reasoning is collapsible; closed by default.
    assert browser.js("document.querySelector('.sample details').open") is False
    # select@LATEST made no REDI pair from random-model traces; the page says so.
    assert "made no REDI pair" in browser.js("document.body.textContent")

    # prune's page: before / after with token counts.
    prune = built["prune"]
    browser.open(f"{server}/#/p/prune/{prune.version}/{pid}", "document.querySelector('#samples')")
    assert "prune: " in browser.js("document.querySelector('.sample .prune').textContent")


def _sentences_of(browser, card: int) -> list:
    return browser.js(f"[...document.querySelectorAll('.sample')[{card}]"
                      ".querySelectorAll('.sentence[data-label]')].map(s => [s.dataset.label,"
                      " s.textContent, s.title, getComputedStyle(s).backgroundColor])")


@needs_chromium
def test_evaluate_problem_shows_models_side_by_side(built, server, browser):
    ev = built["evaluate"]
    samples = ev.read_table("samples").to_pylist()
    pid = samples[0]["problem_id"]
    browser.open(f"{server}/#/p/evaluate/{ev.version}/{pid}?split=samples",
                 "document.querySelector('#models')")
    cols = browser.js("[...document.querySelectorAll('#models .model-col')].map(c => "
                      "[c.dataset.model, c.querySelectorAll('.sample').length, "
                      "Math.round(c.getBoundingClientRect().top)])")
    assert [c[0] for c in cols] == ["sft", "teacher"] or [c[0] for c in cols] == ["teacher", "sft"]
    assert all(c[1] == 2 for c in cols) and len({c[2] for c in cols}) == 1
    # The samples split's filter menu offers the model column.
    browser.open(f"{server}/#/v/evaluate/{ev.version}?split=samples",
                 ROWS_READY + " && document.querySelector('#filter-model')")
    browser.act("(() => { const s = document.querySelector('#filter-model');"
                " s.value = 'sft'; s.dispatchEvent(new Event('change')); })()", ROWS_READY)
    assert "model%3Asft" in browser.js("location.hash")
    assert _count(browser) == sum(r["model"] == "sft" for r in samples)


@needs_chromium
def test_trace_text_is_inert(built, server, browser):
    xss = built["xss"]
    rows = xss.read_table().to_pylist()
    row = rows[0]
    mine = sorted((r for r in rows if r["problem_id"] == row["problem_id"]),
                  key=lambda r: r["sample_idx"])
    browser.open(f"{server}/#/p/provenance/{xss.version}/{row['problem_id']}",
                 "document.querySelector('#samples')")
    assert browser.js("document.querySelector('#problem-text').textContent") == row["problem"]
    text = browser.js("document.querySelector('#samples').textContent")
    assert "<script>window.__xss=1</script>" in text and 'onerror="window.__xss=1"' in text
    assert browser.js("document.querySelectorAll('main script, main img').length") == 0
    # Its two sentences, coloured by label: teacher and student differ.
    sentences = _sentences_of(browser, mine.index(row))
    assert [s[0] for s in sentences] == ["teacher", "student"]
    assert sentences[0][1] == XSS_COMPLETION[:XSS_COMPLETION.index(". Then") + 1]
    assert sentences[0][2] == "teacher: p_T=0.9 p_S=0.1"
    assert sentences[0][3] != sentences[1][3]
    # The table page too: the XSS problem (from the prompts file, through every real stage).
    browser.open(f"{server}/#/v/provenance/{built['provenance'].version}?q=script", ROWS_READY)
    assert _count(browser) == 2
    assert "<script>" in browser.js("document.querySelector('#rows-table').textContent")
    assert browser.js("document.querySelectorAll('main script, main img').length") == 0
    time.sleep(0.3)   # an onerror handler would have run by now
    assert browser.js("typeof window.__xss") == "undefined"


def test_cli_view_binds_loopback_and_warns_on_other_hosts(built):
    """The real command, as a user runs it: prints its URL; 0.0.0.0 prints a warning."""
    import sys

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "view", "--data-root",
                             built["root"], "--port", str(port), "--host", "0.0.0.0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 30
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/runs", timeout=2)
                break
            except httpx.TransportError:
                assert time.time() < deadline and proc.poll() is None, proc.communicate()
                time.sleep(0.1)
        assert r.status_code == 200 and {s["stage"] for s in r.json()["stages"]} >= {"prune"}
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert f":{port}/" in out and "warning: serving on 0.0.0.0" in err
