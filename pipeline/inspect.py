"""Look at versions: manifest, schema, rows, per-column statistics, sample rows, lineage."""
from __future__ import annotations

import json

from pipeline.store import Store, Version


def column_stats(table) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc

    stats = {}
    for name in table.column_names:
        col = table.column(name)
        s = {"type": str(col.type), "nulls": col.null_count}
        t = col.type
        if pa.types.is_boolean(t):
            s["true"] = int(pc.sum(pc.cast(col, pa.int64())).as_py() or 0)
        elif pa.types.is_integer(t) or pa.types.is_floating(t):
            if len(col) - col.null_count:
                s.update(min=pc.min(col).as_py(), mean=round(pc.mean(col).as_py(), 4),
                         max=pc.max(col).as_py())
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            lengths = pc.utf8_length(col)
            if len(col) - col.null_count:
                s.update(mean_chars=round(pc.mean(lengths).as_py(), 1),
                         distinct=pc.count_distinct(col).as_py())
        stats[name] = s
    return stats


def describe(version: Version, rows: int = 3) -> dict:
    out = {"stage": version.stage, "version": version.version, "path": version.path,
           "rows": version.rows, "manifest": version.manifest}
    if version.manifest.get("output") == "model":
        return out
    splits = version.splits or [None]
    out["columns"], out["sample"] = {}, {}
    for split in splits:
        table = version.read_table(split)
        key = split or "data"
        out["columns"][key] = column_stats(table)
        out["sample"][key] = table.slice(0, rows).to_pylist() if rows else []
    return out


def _short(value, width: int = 100) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False) if not isinstance(value, str) else value
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 1] + "…"


def format_description(d: dict) -> str:
    m = d["manifest"]
    lines = [f"{d['stage']}@{d['version']}  {d['path']}",
             f"  finished {m.get('finished_at')}  wall {m.get('wall_s')}s  code {m.get('code_version')}",
             f"  inputs   {m.get('inputs') or '-'}",
             f"  rows     in {m.get('rows_in')}  out {m.get('rows_out')}",
             f"  drops    {m.get('drops') or '-'}"]
    if m.get("stats"):
        lines.append("  stats")
        for k, v in m["stats"].items():
            lines.append(f"    {k}: {_short(v, 110)}")
    lines.append("  config")
    for k, v in (m.get("config") or {}).items():
        lines.append(f"    {k}: {_short(v, 110)}")
    for split, cols in (d.get("columns") or {}).items():
        lines.append(f"  columns ({split})")
        for name, s in cols.items():
            extra = "  ".join(f"{k}={v}" for k, v in s.items() if k != "type")
            lines.append(f"    {name:<22} {s['type']:<14} {extra}")
    for split, rows in (d.get("sample") or {}).items():
        for i, row in enumerate(rows):
            lines.append(f"  row {i} ({split})")
            for k, v in row.items():
                lines.append(f"    {k}: {_short(v)}")
    return "\n".join(lines)


def lineage(store: Store, version: Version, depth: int = 0) -> list[str]:
    m = version.manifest
    lines = [f"{'  ' * depth}{version.ref()}  rows {m.get('rows_out')}  ({m.get('finished_at')})"]
    source = (m.get("stats") or {}).get("source_files")
    if source:  # an imported version was made from a file, not only from other versions
        lines.append(f"{'  ' * (depth + 1)}file {source['path']}  sha256 {source['sha256']}")
    for stage, v in (m.get("inputs") or {}).items():
        parent = store.find(stage, v)
        if parent is None:
            lines.append(f"{'  ' * (depth + 1)}{stage}@{v}  (missing)")
        else:
            lines.extend(lineage(store, parent, depth + 1))
    return lines
