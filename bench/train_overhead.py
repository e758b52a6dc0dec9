"""Where a Ray Train fit's fixed cost goes: one real `distillery run sft` on the tiny model, a
handful of steps, with timestamps at every boundary cluster/train.py's `fit` crosses.

    .venv/bin/python bench/train_overhead.py [--workers 2] [--steps 2] [--profile]

First each import a worker pays, alone in a fresh interpreter. Then the driver side: Ray start,
the ray.train imports, `fit` from call to return; and the worker side (rank 0, and the spread
over ranks): process creation (psutil) to the loop's first line (the Ray worker's start,
ray.train + torch imports, the gloo process group), the transformers / DeepSpeed imports the
loop does, the model and trainer setup, `deepspeed.initialize` (--profile: its cProfile), the
steps, the save, who first imports torch._inductor.compile_fx, and a gloo group of the same
size made again inside the workers (what one process-group start costs). On a shared machine
every figure includes the neighbours' load: the load average is printed with them.
docs/performance.md has a run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def timed_worker(config: dict) -> None:
    """stages/sft.py's worker with timestamps; marks-<rank>.json into the version folder."""
    import time as _t

    entered = _t.time()
    import psutil

    marks = {"process_created": psutil.Process().create_time(), "loop_entered": entered}
    import sys as _sys
    import traceback

    class InductorSpy:
        """Who first imports torch._inductor.compile_fx (seconds of imports) and when."""

        def find_spec(self, name, path=None, target=None):
            if name == "torch._inductor.compile_fx" and "inductor_first_import" not in marks:
                marks["inductor_first_import"] = (_t.time(), "".join(
                    line for line in traceback.format_stack()[:-1]
                    if "site-packages" in line or "/work/" in line)[-2500:])
            return None

    if "torch._inductor.compile_fx" in _sys.modules:
        marks["inductor_first_import"] = (entered, "before the loop")
    _sys.meta_path.insert(0, InductorSpy())
    import torch.distributed as dist

    marks["gloo_initialized_before_loop"] = dist.is_initialized()
    s = _t.time()
    group = dist.new_group(backend="gloo")  # a second group: what the first one cost
    dist.barrier(group=group)
    marks["gloo_new_group_s"] = _t.time() - s
    for name in ("transformers", "deepspeed", "trl"):
        s = _t.time()
        __import__(name)
        marks[f"import_{name}_s"] = _t.time() - s
    s = _t.time()
    from transformers import Trainer, TrainingArguments  # noqa: F401 — the lazy submodules

    import stages.sft
    marks["import_trainer_and_stage_s"] = _t.time() - s

    import deepspeed
    import transformers

    def wrap(owner, attr, key):
        original = getattr(owner, attr)

        def timed(*a, **k):
            start = _t.time()
            try:
                return original(*a, **k)
            finally:
                marks.setdefault(key, []).append((start, _t.time()))
        setattr(owner, attr, timed)

    wrap(deepspeed, "initialize", "deepspeed_initialize")
    if os.environ.get("RANK", "0") == "0":  # where deepspeed.initialize's time goes, rank 0
        import cProfile
        import io
        import pstats

        timed_init = deepspeed.initialize

        def profiled(*a, **k):
            prof = cProfile.Profile()
            try:
                return prof.runcall(timed_init, *a, **k)
            finally:
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(25)
                marks["deepspeed_initialize_profile"] = text.getvalue()
        deepspeed.initialize = profiled
    wrap(transformers.Trainer, "train", "trainer_train")
    wrap(transformers.Trainer, "training_step", "training_step")
    wrap(transformers.Trainer, "save_model", "save_model")
    wrap(transformers.AutoModelForCausalLM, "from_pretrained", "from_pretrained")
    s = _t.time()
    stages.sft.sft_worker(config)
    marks["sft_worker"] = (s, _t.time())
    import sys as _sys

    marks["inductor_imported"] = "torch._inductor.compile_fx" in _sys.modules
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(config["out_dir"], f"marks-{rank}.json"), "w") as f:
        json.dump(marks, f)


def fresh_imports() -> dict:
    """Each import in a new interpreter, in the order a worker pays them (cumulative)."""
    code = ("import time, json; out = {}; t = time.time()\n"
            "for m in ['torch', 'ray', 'ray.train.torch', 'transformers', 'deepspeed', 'trl']:\n"
            "    s = time.time(); __import__(m); out[m] = round(time.time() - s, 2)\n"
            "from transformers import Trainer\n"
            "out['transformers.Trainer'] = round(time.time() - t - sum(out.values()), 2)\n"
            "print(json.dumps(out))")
    s = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["interpreter_total_s"] = round(time.time() - s, 2)
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="print deepspeed.initialize's profile")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()}")
    print("fresh-interpreter imports (s):", fresh_imports())

    from pipeline.apps.tiny_model import build_tiny_model
    from test_sft import RECIPE, write_select

    tmp = tempfile.mkdtemp(prefix="train-overhead-")
    model = build_tiny_model(os.path.join(tmp, "model"))
    data_root = os.path.join(tmp, "data")
    write_select(data_root)

    t = time.time()
    from pipeline.stage import ensure_ray
    ensure_ray()
    ray_start = time.time() - t
    t = time.time()
    from ray.train.torch import TorchTrainer  # noqa: F401
    train_import = time.time() - t

    import cluster.train
    import stages.sft
    from pipeline.config import load_recipe
    from pipeline.runner import run_stage
    from stages import STAGES

    real_fit, driver = cluster.train.fit, {}
    seen: dict[str, float] = {}

    def watch():
        """Creation times of the Ray Train processes (their titles name them)."""
        import psutil

        while "fit_returned" not in driver:
            for proc in psutil.process_iter(["cmdline", "create_time"]):
                title = " ".join(proc.info["cmdline"] or [])
                for kind in ("TrainController", "RayTrainWorker"):
                    if (f"ray::{kind}" in title and proc.pid not in seen
                            and proc.info["create_time"] >= driver["fit_called"] - 1):
                        seen[proc.pid] = (kind, proc.info["create_time"])
            time.sleep(0.2)

    def timed_fit(*a, **k):
        import threading

        driver["fit_called"] = time.time()
        threading.Thread(target=watch, daemon=True).start()
        try:
            return real_fit(*a, **k)
        finally:
            driver["fit_returned"] = time.time()

    cluster.train.fit = timed_fit
    stages.sft.sft_worker = timed_worker
    recipe = load_recipe(RECIPE, [f"data_root={data_root}", f"student={model}",
                                  f"sft.max_steps={args.steps}", "sft.save_steps=0",
                                  "sft.report_to=none", "sft.tokens_per_step=2048",
                                  f"resources.sft.num_workers={args.workers}"], STAGES)
    t = time.time()
    version = run_stage("sft", recipe, log=lambda *_: None)
    stage_wall = time.time() - t

    ranks = []
    for name in sorted(os.listdir(version.path)):
        if name.startswith("marks-"):
            with open(os.path.join(version.path, name)) as f:
                ranks.append(json.load(f))
    m = ranks[0]
    f0, f1 = driver["fit_called"], driver["fit_returned"]
    ds = m["deepspeed_initialize"][0]
    steps = m["training_step"]
    train = m["trainer_train"][0]
    rows = [
        ("Ray start (ensure_ray, once per driver)", ray_start),
        ("driver: import ray.train.torch (once per driver)", train_import),
        ("fit(): call -> worker process created", m["process_created"] - f0),
        ("worker: process created -> loop entered (Ray worker start, torch + ray.train "
         "imports, gloo group)", m["loop_entered"] - m["process_created"]),
        ("  of which a gloo group of this size made again", m["gloo_new_group_s"]),
        ("worker: import transformers / deepspeed / trl",
         m["import_transformers_s"] + m["import_deepspeed_s"] + m["import_trl_s"]),
        ("worker: import Trainer, TrainingArguments, the stage", m["import_trainer_and_stage_s"]),
        ("worker: loop start -> Trainer.train (args, model load, trainer)",
         train[0] - m["sft_worker"][0]),
        ("  of which from_pretrained", sum(b - a for a, b in m["from_pretrained"])),
        ("worker: Trainer.train -> deepspeed.initialize done", ds[1] - train[0]),
        ("  of which deepspeed.initialize", ds[1] - ds[0]),
        (f"worker: {len(steps)} training steps", steps[-1][1] - steps[0][0]),
        ("worker: deepspeed init done -> first step (dataloader, callbacks)",
         steps[0][0] - ds[1]),
        ("worker: last step -> Trainer.train returns", train[1] - steps[-1][1]),
        ("worker: after train (stats, save_model, tokenizer)", m["sft_worker"][1] - train[1]),
        ("fit(): worker loop done -> fit returns (teardown)", f1 - m["sft_worker"][1]),
        ("fit() total", f1 - f0),
        ("run_stage('sft') total (reads, tokenizes, fit, manifest)", stage_wall),
    ]
    print(f"\n{args.workers} workers, {args.steps} steps; load average now {os.getloadavg()}")
    for label, seconds in rows:
        print(f"{seconds:8.2f} s  {label}")
    spread = [r["loop_entered"] - r["process_created"] for r in ranks]
    print(f"process created -> loop entered, per rank: {[round(s, 2) for s in spread]}")
    print(f"gloo initialized before the loop: {m['gloo_initialized_before_loop']}; "
          f"torch._inductor imported in the worker: {m['inductor_imported']}")
    # The controller may land on a worker process Ray started before fit (an idle one).
    print(f"Ray Train processes seen (kind, created s after fit's call): "
          f"{sorted((k, round(c - f0, 2)) for k, c in seen.values())}")
    if "inductor_first_import" in m:
        at, stack = m["inductor_first_import"]
        print(f"torch._inductor.compile_fx first imported {at - m['loop_entered']:.2f} s after the loop "
              f"started, from:\n{stack}")
    if "--profile" in sys.argv:
        print(m.get("deepspeed_initialize_profile", ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
