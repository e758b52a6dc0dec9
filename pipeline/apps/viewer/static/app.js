// distillery view — one static page, no build step. Every piece of data reaches the DOM through
// textContent / attribute setters (never innerHTML), so trace text can never become markup.
"use strict";

const main = document.getElementById("main");
const crumbs = document.getElementById("crumbs");
const statusLine = document.getElementById("status");
const LABELS = ["teacher", "student", "common", "shared", "boosted", "unscored"];
const TEXT_TYPES = new Set(["VARCHAR"]);

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k in node && k !== "list") node[k] = v;
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function show(value) {
  if (value === null || value === undefined) return "∅";
  if (typeof value === "object") return JSON.stringify(value, null, 1);
  if (typeof value === "number" && !Number.isInteger(value)) return String(+value.toFixed(4));
  return String(value);
}

async function api(path, params) {
  const url = path + (params && String(params) ? "?" + params : "");
  const res = await fetch(url, { headers: { Accept: "application/json" } });
  let body;
  try { body = await res.json(); } catch (e) { body = { error: `HTTP ${res.status}` }; }
  if (!res.ok) throw new Error(body.error || `HTTP ${res.status}`);
  return body;
}

function cellClass(v) {
  if (typeof v === "number") return "num";
  return (typeof v === "string" && v.length > 40) || (v !== null && typeof v === "object") ? "text" : "";
}

function errorBox(err) { return el("div", { class: "error" }, String(err.message || err)); }

function link(text, hash) { return el("a", { href: hash, text }); }

function enc(...parts) { return parts.map(encodeURIComponent).join("/"); }

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const [path, query] = raw.split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { parts, params: new URLSearchParams(query || "") };
}

function setHash(parts, params) {
  const q = params && String(params) ? "?" + params : "";
  location.hash = "#/" + enc(...parts) + q;
}

function setCrumbs(...items) {
  crumbs.replaceChildren(...items.flatMap((it, i) => (i ? [" / ", it] : [it])));
}

// ---------------------------------------------------------------- runs page
async function runsPage() {
  setCrumbs("runs");
  const data = await api("/api/runs");
  const page = el("div", { id: "runs" }, el("p", { class: "muted" }, "data root: " + data.data_root));
  if (!data.stages.length) page.append(el("p", {}, "No stage has written anything under this data root yet."));
  const used = new Set();
  const latest = {};
  for (const s of data.stages) {
    for (const v of s.versions) {
      for (const [st, ver] of Object.entries(v.inputs)) used.add(st + "@" + ver);
      if (v.latest) latest[s.stage] = v;
    }
  }
  for (const s of data.stages) {
    const table = el("table", { class: "versions" }, el("tr", {},
      ...["version", "", "splits", "rows in", "rows out", "drops", "wall s", "finished", "inputs"].map(h => el("th", {}, h))));
    for (const v of [...s.versions].reverse()) {
      const name = v.output === "model" ? el("span", {}, link(v.version, "#/v/" + enc(s.stage, v.version)), " (checkpoint)")
        : link(v.version, "#/v/" + enc(s.stage, v.version));
      table.append(el("tr", { "data-version": v.version },
        el("td", {}, name),
        el("td", {}, v.latest ? el("span", { class: "latest" }, "LATEST") : ""),
        el("td", {}, v.splits.join(", ")),
        el("td", { class: "num" }, show(v.rows_in)),
        el("td", { class: "num" }, show(v.rows_out)),
        el("td", {}, Object.entries(v.drops).filter(([, n]) => n).map(([k, n]) => `${k}: ${n}`).join(", ")),
        el("td", { class: "num" }, v.wall_s == null ? "" : v.wall_s.toFixed(1)),
        el("td", { class: "muted" }, show(v.finished_at)),
        el("td", {}, ...Object.entries(v.inputs).map(([st, ver]) => el("span", {}, link(`${st}@${ver}`, "#/v/" + enc(st, ver)), " ")))));
    }
    for (const r of s.running) {
      const progress = r.of ? `running: ${r.shards} of ${r.of} shards` : `running: ${r.shards} shards written`;
      table.append(el("tr", { class: "running-row" }, el("td", {}, r.shards ? link(r.version, "#/v/" + enc(s.stage, r.version)) : r.version),
        el("td", { colspan: 8 }, el("span", { class: "running" }, progress))));
    }
    for (const name of s.incomplete) {
      table.append(el("tr", {}, el("td", {}, name), el("td", { colspan: 8 },
        el("span", { class: "incomplete" }, "half-written: no manifest, not read"))));
    }
    page.append(el("h2", {}, s.stage), table);
  }
  // Lineage: one indented tree per LATEST version that no other version reads (the run's tips).
  const byRef = {};
  for (const s of data.stages) for (const v of s.versions) byRef[s.stage + "@" + v.version] = v;
  const tips = Object.entries(latest).filter(([st, v]) => !used.has(st + "@" + v.version));
  if (tips.length) {
    page.append(el("h2", {}, "lineage"));
    const tree = el("div", { class: "tree", id: "lineage" });
    const node = (ref, seen) => {
      const v = byRef[ref];
      const [st, ver] = ref.split("@");
      const li = el("li", {}, link(ref, "#/v/" + enc(st, ver)), v ? el("span", { class: "muted" }, `  rows ${show(v.rows_out)}`) : el("span", { class: "incomplete" }, " missing"));
      if (v && !seen.has(ref)) {
        const inner = Object.entries(v.inputs).map(([s2, v2]) => node(s2 + "@" + v2, new Set([...seen, ref])));
        if (inner.length) li.append(el("ul", {}, ...inner));
      }
      return li;
    };
    tree.append(el("ul", {}, ...tips.map(([st, v]) => node(st + "@" + v.version, new Set()))));
    page.append(tree);
  }
  return page;
}

function lineageTree(node) {
  const li = el("li", {}, node.missing ? el("span", {}, `${node.stage}@${node.version} `, el("span", { class: "incomplete" }, "missing"))
    : link(`${node.stage}@${node.version}`, "#/v/" + enc(node.stage, node.version)),
    node.rows_out != null ? el("span", { class: "muted" }, "  rows " + show(node.rows_out)) : "");
  if (node.inputs.length) li.append(el("ul", {}, ...node.inputs.map(lineageTree)));
  return li;
}

// ---------------------------------------------------------------- a version's rows
const STATE_KEYS = ["split", "f", "label", "r", "closed", "q", "sort", "desc", "offset", "cols"];

function filterParams(params, keep) {
  const out = new URLSearchParams();
  for (const [k, v] of params) if (keep.includes(k)) out.append(k, v);
  return out;
}

async function versionPage(stage, version, params) {
  const splitParam = new URLSearchParams();
  if (params.get("split")) splitParam.set("split", params.get("split"));
  const info = await api("/api/version/" + enc(stage, version), splitParam);
  const split = info.split || null;
  setCrumbs(link("runs", "#/"), `${stage}@${version}` + (split ? ` · ${split}` : ""));
  const page = el("div", { id: "version" });
  const m = info.manifest;
  if (info.status === "running") {
    page.append(el("p", {}, el("span", { class: "running" }, `running: ${info.shards} shards written`),
      " — the rows below are the finished shards; the version is not complete yet."));
  }
  if (m) {
    page.append(el("p", { class: "muted" },
      `rows in ${show(m.rows_in)} → rows out ${show(m.rows_out)}; wall ${show(m.wall_s)} s; finished ${show(m.finished_at)}; code ${show(m.code_version)}`));
    const drops = Object.entries(m.drops || {}).filter(([, n]) => n);
    if (drops.length) page.append(el("p", {}, "drops: " + drops.map(([k, n]) => `${k} ${n}`).join(", ")));
    if (info.splits.length) {
      page.append(el("p", { class: "splits" }, "splits: ", ...info.splits.map(s =>
        el("span", {}, s === split ? el("b", {}, s) : link(s, "#/v/" + enc(stage, version) + "?split=" + encodeURIComponent(s)), " "))));
    }
    page.append(el("details", {}, el("summary", {}, "lineage"), el("div", { class: "tree" }, el("ul", {}, lineageTree(info.lineage)))));
    page.append(el("details", {}, el("summary", {}, "manifest"), el("pre", { class: "text" }, JSON.stringify(m, null, 2))));
    if (m.output === "model") {
      page.append(el("p", {}, "A model checkpoint: no rows to show."));
      return page;
    }
  }
  const state = filterParams(params, STATE_KEYS);
  if (split) state.set("split", split);
  const apiState = filterParams(state, ["split", "f", "label", "r", "closed", "q"]);
  const go = (mutate) => { const next = new URLSearchParams(state); next.delete("offset"); mutate(next); setHash(["v", stage, version], next); };
  const columns = Object.keys(info.columns);

  // Filters (values with counts), sentence label, search, sort.
  const toolbar = el("div", { class: "toolbar", id: "filters" });
  const search = el("input", { id: "search", type: "search", placeholder: "search problems and completions", value: state.get("q") || "", size: 34 });
  search.addEventListener("keydown", e => { if (e.key === "Enter") go(n => { if (search.value) n.set("q", search.value); else n.delete("q"); }); });
  toolbar.append(search, el("button", { id: "search-go", onclick: () => go(n => { if (search.value) n.set("q", search.value); else n.delete("q"); }) }, "search"));
  const sortSel = el("select", { id: "sort" }, el("option", { value: "" }, "sort: none"),
    ...columns.filter(c => !/[\[\]]|STRUCT|MAP/.test(info.columns[c]))
      .map(c => el("option", { value: c, selected: state.get("sort") === c }, "sort: " + c)));
  sortSel.addEventListener("change", () => go(n => { if (sortSel.value) n.set("sort", sortSel.value); else n.delete("sort"); }));
  const desc = el("input", { type: "checkbox", id: "desc", checked: state.get("desc") === "1" });
  desc.addEventListener("change", () => go(n => { if (desc.checked) n.set("desc", "1"); else n.delete("desc"); }));
  toolbar.append(sortSel, el("label", {}, desc, "descending"));
  page.append(toolbar);
  api("/api/facets/" + enc(stage, version), splitParam).then(facets => {
    const active = {};
    for (const f of state.getAll("f")) { const i = f.indexOf(":"); active[f.slice(0, i)] = f.slice(i + 1); }
    for (const [col, values] of Object.entries(facets)) {
      const isLabel = col === "label";
      const current = isLabel ? state.get("label") : active[col];
      const sel = el("select", { "data-filter": col, id: "filter-" + col },
        el("option", { value: "" }, (isLabel ? "sentence label" : col) + ": any"),
        ...values.map(([v, n]) => el("option", { value: v, selected: current === v }, `${isLabel ? "sentence label" : col}: ${v} (${n})`)));
      sel.addEventListener("change", () => go(n => {
        if (isLabel) { n.delete("label"); if (sel.value) n.set("label", sel.value); return; }
        const rest = n.getAll("f").filter(f => !f.startsWith(col + ":"));
        n.delete("f"); rest.forEach(f => n.append("f", f)); if (sel.value) n.append("f", col + ":" + sel.value);
      }));
      toolbar.insertBefore(sel, search);
    }
  }).catch(e => toolbar.append(errorBox(e)));

  // Active range filters (from histogram clicks): click to remove.
  const ranges = state.getAll("r");
  if (ranges.length) {
    page.append(el("div", { class: "chips" }, "ranges: ", ...ranges.map(r => el("span", {
      title: "remove", onclick: () => go(n => { const keep = n.getAll("r").filter(x => x !== r); n.delete("r"); keep.forEach(x => n.append("r", x)); if (!keep.length) n.delete("closed"); })
    }, r.split(":")[0] + " " + Number(r.split(":")[1]).toPrecision(3) + "…" + Number(r.split(":")[2]).toPrecision(3) + " ×"))));
  }

  // Column chooser.
  const chosen = (state.get("cols") || "").split(",").filter(Boolean);
  const chooser = el("details", { class: "cols" }, el("summary", {}, "columns"));
  const boxes = columns.map(c => el("input", { type: "checkbox", value: c, checked: chosen.includes(c) }));
  chooser.append(...columns.map((c, i) => el("label", {}, boxes[i], c)),
    el("button", { id: "cols-apply", onclick: () => go(n => { const pick = boxes.filter(b => b.checked).map(b => b.value); if (pick.length) n.set("cols", pick.join(",")); else n.delete("cols"); }) }, "apply"));
  page.append(chooser);

  // Histograms that filter when clicked.
  const hists = el("div", { class: "hists" });
  page.append(hists);
  for (const col of info.histograms) {
    const box = el("div", { class: "hist", id: "hist-" + col }, el("div", {}, col), el("div", { class: "muted" }, "…"));
    hists.append(box);
    api("/api/hist/" + enc(stage, version, col), apiState).then(h => {
      const max = Math.max(1, ...h.bins.map(b => b.count));
      const bars = el("div", { class: "bars" }, ...h.bins.map(b => el("div", {
        class: "bar", title: `${show(b.lo)} – ${show(b.hi)}: ${b.count}`,
        "data-count": b.count,
        onclick: () => go(n => { n.append("r", `${col}:${b.lo}:${b.hi}`); if (b.last) n.set("closed", col); })
      })));
      // Heights through the CSSOM (the page's CSP allows no inline style attributes).
      [...bars.children].forEach((bar, i) => { bar.style.height = Math.round(70 * h.bins[i].count / max) + "px"; });
      const axis = h.bins.length ? el("div", { class: "axis" }, el("span", {}, show(h.bins[0].lo)), el("span", {}, show(h.bins[h.bins.length - 1].hi))) : el("div", { class: "muted" }, "no values");
      box.replaceChildren(el("div", {}, col), bars, axis);
    }).catch(e => box.append(errorBox(e)));
  }

  // The table, one page at a time; the count comes after (a search may scan every row).
  const count = el("p", { id: "count", class: "muted" }, "counting…");
  const tableBox = el("div", { id: "rows" }, "loading…");
  const offset = Number(state.get("offset") || 0);
  const limit = 50;
  const pager = el("div", { class: "pager" },
    el("button", { id: "prev", disabled: offset === 0, onclick: () => { const n = new URLSearchParams(state); n.set("offset", Math.max(0, offset - limit)); setHash(["v", stage, version], n); } }, "← previous"),
    el("button", { id: "next", onclick: () => { const n = new URLSearchParams(state); n.set("offset", offset + limit); setHash(["v", stage, version], n); } }, "next →"),
    el("span", { class: "muted" }, ` rows ${offset + 1}–${offset + limit}`));
  page.append(count, pager, tableBox);
  const rowParams = filterParams(state, STATE_KEYS);
  rowParams.set("limit", limit);
  api("/api/rows/" + enc(stage, version), rowParams).then(res => {
    const shown = res.columns.filter(c => c !== "problem_id" || !chosen.length || chosen.includes("problem_id"));
    const table = el("table", { id: "rows-table" }, el("tr", {}, ...shown.map(c => el("th", {
      class: "sortable", title: "sort by " + c,
      onclick: () => go(n => { if (n.get("sort") === c) { if (n.get("desc") === "1") n.delete("desc"); else n.set("desc", "1"); } else { n.set("sort", c); n.delete("desc"); } })
    }, c + (state.get("sort") === c ? (state.get("desc") === "1" ? " ▼" : " ▲") : "")))));
    const pidIndex = res.columns.indexOf("problem_id");
    for (const row of res.rows) {
      const tr = el("tr", {});
      shown.forEach(c => {
        const v = row[res.columns.indexOf(c)];
        const cut = typeof v === "string" && v.length >= res.cell_chars ? "…" : "";
        if (c === "problem_id" && v !== null) {
          const p = new URLSearchParams(); if (split) p.set("split", split);
          tr.append(el("td", {}, link(v, "#/p/" + enc(stage, version, v) + (String(p) ? "?" + p : ""))));
        } else {
          tr.append(el("td", { class: cellClass(v) }, show(v) + cut));
        }
      });
      if (pidIndex >= 0 && !shown.includes("problem_id")) {
        const v = row[pidIndex];
        tr.firstChild && tr.firstChild.prepend(link("open ", "#/p/" + enc(stage, version, v) + (split ? "?split=" + encodeURIComponent(split) : "")));
      }
      table.append(tr);
    }
    tableBox.replaceChildren(res.rows.length ? table : el("p", {}, "No row matches."));
    document.getElementById("next").disabled = res.rows.length < limit;
  }).catch(e => tableBox.replaceChildren(errorBox(e)))
    // After the page: a search's total comes from the page's own scan (the server keeps it).
    .finally(() => api("/api/count/" + enc(stage, version), apiState)
      .then(c => { count.textContent = `${c.total} rows match`; })
      .catch(e => count.replaceChildren(errorBox(e))));

  // The SQL box: one read-only SELECT over the table `data` (this version / split).
  const sqlInput = el("textarea", { id: "sql-input", spellcheck: false },
    "SELECT difficulty, count(*) AS n FROM data GROUP BY difficulty ORDER BY n DESC");
  if (!columns.includes("difficulty")) sqlInput.value = "SELECT * FROM data LIMIT 10";
  const sqlOut = el("div", { id: "sql-result" });
  const runSql = async () => {
    sqlOut.replaceChildren("running…");
    const p = new URLSearchParams(splitParam); p.set("q", sqlInput.value);
    try {
      const res = await api("/api/sql/" + enc(stage, version), p);
      const t = el("table", { id: "sql-table" }, el("tr", {}, ...res.columns.map(c => el("th", {}, c))),
        ...res.rows.map(r => el("tr", {}, ...r.map(v => el("td", { class: cellClass(v) }, show(v))))));
      sqlOut.replaceChildren(t, res.truncated ? el("p", { class: "muted" }, `first ${res.row_limit} rows shown`) : "");
    } catch (e) { sqlOut.replaceChildren(errorBox(e)); }
  };
  page.append(el("h3", {}, "SQL (one SELECT over the table ", el("code", {}, "data"), "; read-only)"),
    sqlInput, el("div", {}, el("button", { id: "sql-run", onclick: runSql }, "run")), sqlOut);
  return page;
}

// ---------------------------------------------------------------- a problem
function verdictOf(row) {
  if (row.correct === true) return ["correct", "correct"];
  if (row.correct === false) return ["wrong", "wrong"];
  return ["unknown", "unverified"];
}

function textBlock(title, text, open) {
  if (text === undefined) return null;
  return el("details", { open: !!open }, el("summary", {}, `${title} (${text === null ? 0 : text.length} chars)`),
    el("pre", { class: "text" }, text === null ? "∅" : text));
}

function provenanceBlock(row) {
  const text = row.pruned_completion;
  const spans = row.sentence_spans || [];
  const labels = row.sentence_labels || [];
  const pT = row.sentence_p_teacher || [];
  const pS = row.sentence_p_student || [];
  const pre = el("pre", { class: "text provenance" });
  let at = 0;
  spans.forEach(([start, end], i) => {
    if (start > at) pre.append(text.slice(at, start));
    const label = LABELS.includes(labels[i]) ? labels[i] : "common";
    pre.append(el("span", {
      class: "sentence " + label, "data-label": label,
      title: `${labels[i]}: p_T=${show(pT[i])} p_S=${show(pS[i])}`
    }, text.slice(start, end)));
    at = end;
  });
  if (at < (text || "").length) pre.append(text.slice(at));
  return el("div", { class: "prov" },
    el("div", { class: "legend" }, "provenance: ", ...LABELS.slice(0, 3).concat(["boosted"]).map(l => el("span", { class: "sentence " + l }, l)),
      el("span", { class: "muted" }, ` score ${show(row.provenance_score)} · teacher share ${show(row.teacher_share)} · selected ${show(row.selected)} (${show(row.select_reason)})`)),
    pre);
}

function sampleCard(row) {
  const [cls, word] = verdictOf(row);
  const card = el("div", { class: "card sample " + cls, "data-trace": row.trace_id || "" },
    el("div", {}, el("b", {}, row.sample_idx !== undefined ? `sample ${row.sample_idx}` : (row.trace_id || "row")),
      "  ", el("span", { class: "verdict" }, word), "  answer: ", el("code", { class: "pred" }, show(row.pred_answer))),
    el("div", { class: "muted" }, ["verify_status", "finish_reason", "completion_tokens", "prune_status"]
      .filter(k => k in row).map(k => `${k} ${show(row[k])}`).join(" · ")));
  if ("reasoning" in row) {
    card.append(textBlock("reasoning", row.reasoning, false), el("div", {}, "final:"), el("pre", { class: "text final" }, show(row.final)));
  } else if ("completion" in row) {
    // Open unless the provenance view below shows the same text, coloured.
    card.append(textBlock("completion", row.completion, !(row.sentence_spans)));
  }
  if ("pruned_completion" in row && !("sentence_spans" in row)) {
    const same = row.pruned_completion === row.completion;
    card.append(el("div", { class: "prune" }, `prune: ${show(row.prune_status)} · ${show(row.completion_tokens)} → ${show(row.pruned_tokens)} tokens`,
      same ? el("span", { class: "muted" }, " (text unchanged)") : el("div", { class: "side" },
        el("div", {}, el("h3", {}, `before (${show(row.completion_tokens)} tokens)`), el("pre", { class: "text" }, show(row.completion))),
        el("div", {}, el("h3", {}, `after (${show(row.pruned_tokens)} tokens)`), el("pre", { class: "text" }, show(row.pruned_completion))))));
  }
  if ("sentence_spans" in row && row.sentence_spans) card.append(provenanceBlock(row));
  for (const k of ["messages", "prompt", "chosen", "rejected"]) {
    if (k in row) card.append(textBlock(k, JSON.stringify(row[k], null, 1), k !== "prompt"));
  }
  return card;
}

async function problemPage(stage, version, pid, params) {
  const p = new URLSearchParams(); if (params.get("split")) p.set("split", params.get("split"));
  setCrumbs(link("runs", "#/"), link(`${stage}@${version}`, "#/v/" + enc(stage, version) + (String(p) ? "?" + p : "")), "problem " + pid);
  const data = await api("/api/problem/" + enc(stage, version, pid), p);
  const page = el("div", { id: "problem" });
  if (!data.rows.length) { page.append(el("p", {}, "No row of this version has this problem_id.")); return page; }
  const first = data.rows[0];
  page.append(el("h2", {}, "problem"), el("pre", { class: "text", id: "problem-text" }, show(first.problem)),
    el("p", {}, "reference answer: ", el("code", { id: "reference" }, show(first.answer)),
      "difficulty" in first ? `  · difficulty ${show(first.difficulty)}` : "",
      "pass_rate" in first ? `  · pass rate ${show(first.pass_rate)}` : ""));
  if ("model" in first) {
    // evaluate: the same problem answered by each model, side by side.
    const models = [...new Set(data.rows.map(r => r.model))];
    page.append(el("h2", {}, `${models.length} models, side by side`), el("div", { class: "side", id: "models" },
      ...models.map(m => el("div", { class: "model-col", "data-model": m }, el("h3", {}, m + " · " +
        data.rows.filter(r => r.model === m && r.correct === true).length + "/" + data.rows.filter(r => r.model === m).length + " correct"),
        ...data.rows.filter(r => r.model === m).map(sampleCard)))));
  } else {
    page.append(el("h2", {}, `${data.rows.length} samples`), el("div", { class: "samples", id: "samples" }, ...data.rows.map(sampleCard)));
  }
  if (data.pairs && data.pairs.rows.length) {
    page.append(el("h2", {}, `REDI pair (select@${data.pairs.version})`), ...data.pairs.rows.map(pair => el("div", { class: "side pair" },
      el("div", { class: "card correct" }, el("b", {}, "chosen " + show(pair.chosen_trace_id)), el("pre", { class: "text" }, (pair.chosen || []).map(m => m.content).join("\n"))),
      el("div", { class: "card wrong" }, el("b", {}, "rejected " + show(pair.rejected_trace_id)), el("pre", { class: "text" }, (pair.rejected || []).map(m => m.content).join("\n"))))));
  } else if (data.pairs) {
    page.append(el("p", { class: "muted" }, `select@${data.pairs.version} made no REDI pair for this problem.`));
  }
  return page;
}

// ---------------------------------------------------------------- routing
async function render() {
  const { parts, params } = parseHash();
  statusLine.textContent = "loading…";
  try {
    let page;
    if (parts[0] === "v" && parts.length === 3) page = await versionPage(parts[1], parts[2], params);
    else if (parts[0] === "p" && parts.length === 4) page = await problemPage(parts[1], parts[2], parts[3], params);
    else page = await runsPage();
    main.replaceChildren(page);
    statusLine.textContent = "";
  } catch (e) {
    main.replaceChildren(errorBox(e));
    statusLine.textContent = "";
  }
  document.body.dataset.ready = String(Date.now());
}

window.addEventListener("hashchange", render);
render();
