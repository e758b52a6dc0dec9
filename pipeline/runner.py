"""Run one stage: resolve inputs, hash the version, skip if it exists, run, write, manifest last."""
from __future__ import annotations

import ast
import dataclasses
import datetime as dt
import functools
import hashlib
import importlib.util
import json
import os
import posixpath
import sys
import time

from pipeline.resources import fit_to_cluster
from pipeline.config import Recipe
from pipeline.errors import UserError
from pipeline.stage import Context, Stage, check_storage
from pipeline.store import Store, Version

CODE_VERSION = "0.1.0"


# The project's top-level packages (pipeline, stages, cluster, …): the folders beside this one.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _project_file(name: str) -> str | None:
    """The source file of project module `name` (a module or a package's __init__), found on
    disk without importing anything; None for anything else (torch, the stdlib, a test)."""
    if not os.path.isfile(os.path.join(_ROOT, name.split(".")[0], "__init__.py")):
        return None
    base = os.path.join(_ROOT, *name.split("."))
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


@functools.lru_cache(maxsize=None)  # keyed on the source text: an edited file is parsed again
def _imported_modules(source: str, module: str, is_package: bool) -> frozenset[str]:
    """Every project module an import statement in `source` names, at any depth (function-level
    imports are most of the project's). `from pkg import name` is the submodule pkg.name when
    there is one, else pkg itself (the name is defined in its __init__)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module if is_package else module.rpartition(".")[0]
                base = importlib.util.resolve_name("." * node.level + (node.module or ""),
                                                   package)
            else:
                base = node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if alias.name != "*" and _project_file(sub) else base)
    return frozenset(name for name in found if _project_file(name))


def _module_sources(module: str, seen: dict[str, str]) -> None:
    """The source of `module` and of every project module it imports, transitively, wherever
    it lives (pipeline/, stages/, stages/lib/, cluster/, …). A parent package's __init__ counts
    only when it is imported itself: stages/__init__ imports every stage, and editing evaluate
    must not make new sft versions."""
    if module in seen:
        return
    path = _project_file(module)
    if path is None:  # the stage's own module outside the packages: a test's, a script's
        path = getattr(sys.modules.get(module), "__file__", None)
        if path is None:
            path = importlib.util.find_spec(module).origin
    with open(path, encoding="utf-8") as f:
        seen[module] = f.read()
    for name in sorted(_imported_modules(seen[module], module, path.endswith("__init__.py"))):
        _module_sources(name, seen)


def code_sources(stage: Stage) -> dict[str, str]:
    """{module name: source} of everything the stage's code version covers."""
    sources: dict[str, str] = {}
    _module_sources(stage.run.__module__, sources)
    return sources


def code_version(stage: Stage) -> str:
    """Package version + a hash of the stage's module and of every project module it imports,
    transitively (stages/lib/packed.py, cluster/inference.py, pipeline/textfile.py, …): editing any
    of them makes new versions."""
    sources = code_sources(stage)
    blob = "\n".join(f"{name}\n{sources[name]}" for name in sorted(sources)).encode()
    return f"{CODE_VERSION}+{hashlib.sha256(blob).hexdigest()[:8]}"


def version_hash(stage: Stage, cfg, inputs: dict[str, Version]) -> str:
    # 12 hex chars = 48 bits: collisions among a stage's versions are not a practical concern.
    key = {
        "stage": stage.name,
        "config": dataclasses.asdict(cfg),
        "inputs": {name: v.version for name, v in inputs.items()},
        "code": code_version(stage),
    }
    blob = json.dumps(key, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _schema_columns(version: Version) -> list[str]:
    schema = version.manifest.get("schema") or {}
    if version.splits:
        return sorted({c for cols in schema.values() for c in cols})
    return list(schema)


def resolve_inputs(stage: Stage, store: Store, pins: dict[str, str], cfg=None) -> dict[str, Version]:
    """The versions the stage reads: pinned, else LATEST; of `reads`, those `stage.uses(cfg)`
    names (and any pinned one)."""
    used = set(stage.reads) if stage.uses is None or cfg is None else stage.uses(cfg)
    inputs = {}
    for name in [r for r in stage.reads if r in used or r in pins]:
        if name in pins:
            inputs[name] = store.get(name, pins[name])
        else:
            found = store.latest(name)
            if found is None:
                raise UserError(f"stage '{stage.name}' reads '{name}', which has no complete "
                                f"version under {store.url}: run `distillery run {name}` first")
            inputs[name] = found
    if stage.reads and stage.requires and stage.reads[0] in inputs:
        first = inputs[stage.reads[0]]
        have = set(_schema_columns(first))
        missing = [c for c in stage.requires if c not in have]
        if missing:
            raise UserError(f"stage '{stage.name}' needs columns {missing} that "
                            f"{first.ref()} does not have (it has {sorted(have)})")
    return inputs


def _write_dataset(ds, folder: str, store: Store) -> None:
    """Write a Ray Dataset (or a pyarrow Table, for small driver-side stages) as part-*.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    store.fs.makedirs(folder, exist_ok=True)
    if isinstance(ds, pa.Table):
        with store.fs.open(posixpath.join(folder, "part-00000.parquet"), "wb") as f:
            pq.write_table(ds, f)
        return
    ds.write_parquet(folder, filesystem=store.arrow_fs())
    # Ray names files <write uuid>_<task>-<block>.parquet; give them the layout's part-NNNNN
    # names, in Ray's order (uuid is one per write, so sorting keeps task order).
    written = sorted(p for p in store.fs.ls(folder, detail=False) if p.endswith(".parquet"))
    for i, path in enumerate(written):
        store.fs.mv(path, posixpath.join(folder, f"part-{i:05d}.parquet"))
    if not store.fs.glob(posixpath.join(folder, "part-*.parquet")):
        # Zero rows: Ray writes no file, but readers still need the schema.
        schema = ds.schema()
        arrow_schema = schema.base_schema if schema is not None else pa.schema([])
        with store.fs.open(posixpath.join(folder, "part-00000.parquet"), "wb") as f:
            pq.write_table(arrow_schema.empty_table(), f)


def _describe(store: Store, folder: str) -> tuple[int, dict]:
    """Row count and {column: arrow type} from the Parquet footers (no data read)."""
    import pyarrow.parquet as pq

    rows, schema = 0, {}
    for path in sorted(store.fs.glob(posixpath.join(folder, "part-*.parquet"))):
        with store.fs.open(path, "rb") as f:
            meta = pq.read_metadata(f)
        rows += meta.num_rows
        schema = {name: str(meta.schema.to_arrow_schema().field(name).type)
                  for name in meta.schema.to_arrow_schema().names}
    return rows, schema


def run_stage(name: str, recipe: Recipe, pins: dict[str, str] | None = None,
              stages: dict[str, Stage] | None = None, log=print) -> Version:
    """Run stage `name` of the recipe (its STAGES dict: `recipe.stage_defs`, or `stages`)."""
    stages = stages or recipe.stage_defs
    stage = stages[name]
    cfg = recipe.configs[name]
    store = Store(recipe.data_root)
    inputs = resolve_inputs(stage, store, pins or {}, cfg)
    version = version_hash(stage, cfg, inputs)
    existing = store.find(name, version)
    if existing is not None:
        store.set_latest(name, version)
        log(f"{name}@{version} already exists with the same inputs and config: nothing to do "
            f"({existing.path})")
        return existing

    check_storage(recipe.data_root)  # a multi-node cluster must see data_root: refuse before work
    # `auto` sized to the cluster, and a request the cluster can never hold refused, before
    # the version folder exists: the stage then sees plain numbers.
    resources = fit_to_cluster(name, recipe.resources[name], log=log)
    out_dir = store.begin(name, version, clear=not stage.resumable)
    first = inputs.get(stage.reads[0]) if stage.reads else None
    ctx = Context(stage=name, version=version, out_dir=out_dir, data_root=recipe.data_root,
                  teacher=recipe.teacher, student=recipe.student,
                  resources=resources, rows_in=first.rows if first else None)
    log(f"{name}@{version}: running (inputs: "
        f"{', '.join(v.ref() for v in inputs.values()) or 'none'})")
    started = time.time()
    try:
        result = stage.run(cfg, inputs, ctx)
        splits = []
        if isinstance(result, dict):
            for split, ds in result.items():
                _write_dataset(ds, posixpath.join(out_dir, split), store)
                splits.append(split)
        elif result is not None:
            _write_dataset(result, out_dir, store)
    except BaseException:
        if not stage.resumable:
            store.abort(name, version)  # nothing half-written stays behind
        raise

    if stage.output == "model":
        rows, schema = None, {}
    elif splits:
        rows, schema = {}, {}
        for split in splits:
            rows[split], schema[split] = _describe(store, posixpath.join(out_dir, split))
    else:
        rows, schema = _describe(store, out_dir)
    have = set(schema) if not splits else {c for cols in schema.values() for c in cols}
    missing = [c for c in stage.adds if c not in have] if stage.output == "dataset" else []
    if missing:
        store.abort(name, version)
        raise RuntimeError(f"stage '{name}' promised columns {missing} but did not write them")

    finished = dt.datetime.now(dt.timezone.utc)
    manifest = {
        "stage": name,
        "version": version,
        "config": dataclasses.asdict(cfg),
        "inputs": {n: v.version for n, v in inputs.items()},
        "code_version": code_version(stage),
        "output": stage.output,
        "splits": splits,
        "rows_in": ctx.rows_in,
        "rows_out": rows,
        "drops": dict(ctx.drops),
        "schema": schema,
        "stats": ctx.stats,
        "started_at": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(),
        "finished_at": finished.isoformat(),
        "wall_s": round(time.time() - started, 3),
    }
    done = store.commit(name, version, manifest)
    log(f"{name}@{version}: done in {manifest['wall_s']:.1f}s, rows {rows} -> {done.path}")
    return done


def run_all(recipe: Recipe, pins: dict[str, str] | None = None, log=print) -> dict[str, Version]:
    return {name: run_stage(name, recipe, pins, log=log) for name in recipe.stages}
