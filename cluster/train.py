"""How training runs — Ray Train workers with DeepSpeed ZeRO — never what it computes.

The training stages (sft, redi, kd, opd) call `fit(loop, config, resources, ctx, rows)`:
one Ray Train `TorchTrainer` with `resources.num_workers` workers (one process per GPU on GPU),
the torch process group on gloo (CPU) or NCCL (GPU), and inside each worker a transformers/TRL
trainer configured with the ZeRO json from cluster/deepspeed/ (stage 2 default, 3 selectable,
optional CPU offload). The same code runs on a laptop's local Ray and on a cluster
(RAY_ADDRESS): only `resources:` in the recipe changes.

    resources:
      sft:  {num_workers: 8, use_gpu: true, zero_stage: 2}
      redi: {num_workers: 8, use_gpu: true, zero_stage: 3, offload: true}
"""
from __future__ import annotations

import copy
import glob
import json
import os
import re
import resource
import shutil
import time

from pipeline.errors import UserError
from pipeline.progress import Progress
from pipeline.resources import claim

HERE = os.path.dirname(os.path.abspath(__file__))


def deepspeed_config(zero_stage: int, offload: bool) -> dict:
    """The ZeRO json for this run as a dict (TrainingArguments(deepspeed=...) takes a dict).

    Batch sizes, clipping and bf16 stay "auto": the HF integration fills them from the
    TrainingArguments, so the json never disagrees with the trainer (docs/stack.md: TRL's SFTConfig
    turns bf16 on by default and a json saying `false` is then rejected).
    """
    if zero_stage not in (2, 3):
        raise UserError(f"resources.zero_stage: {zero_stage} is not supported (use 2 or 3)")
    with open(os.path.join(HERE, "deepspeed", f"zero{zero_stage}.json"), encoding="utf-8") as f:
        ds = json.load(f)
    if offload:
        # Optimizer state (fp32 master weights + Adam moments = 12 bytes/param) to host memory;
        # at stage 3 the parameters too. Trades step time for GPU memory.
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if zero_stage == 3:
            ds["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True}
    return ds


def torch_extensions_dir() -> str:
    """Where DeepSpeed's JIT-built ops are cached (TORCH_EXTENSIONS_DIR, else under ~/.cache)."""
    return os.environ.get("TORCH_EXTENSIONS_DIR",
                          os.path.expanduser("~/.cache/distillery/torch_extensions"))


def prebuild_deepspeed_ops() -> None:
    """Build DeepSpeed's shared-memory comm op now (`make install` calls this) instead of in
    the first training run. deepspeed.comm builds it whenever a process group starts on a CPU
    accelerator (deepspeed/comm/torch.py build_shm_op); the build is keyed on the compiler
    command, which names the venv, so every fresh clone rebuilds it, inside the first sft run
    unless built here (tens of seconds on 2 cores: docs/performance.md). Where the accelerator
    has no such op (or it does not fit), nothing is built."""
    os.environ["TORCH_EXTENSIONS_DIR"] = torch_extensions_dir()
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        print("deepspeed: no shared-memory comm op for this accelerator; nothing to build")
        return
    # torch's JIT build holds a `lock` file in the op's folder while it compiles; a build killed
    # midway leaves it behind and every later load waits on it forever. `make install` is the
    # only builder at its time, so a lock older than a minute here is stale.
    for lock in glob.glob(os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], "*", "lock")):
        if time.time() - os.path.getmtime(lock) > 60:
            print(f"deepspeed: removing a stale build lock {lock}")
            os.remove(lock)
    try:
        builder.load()
    except Exception as ex:  # noqa: BLE001 — install goes on; the first training run builds it
        print(f"deepspeed: prebuilding {builder.absolute_name()} failed ({type(ex).__name__}: "
              f"{ex}); the first training run will build it")
        return
    print(f"deepspeed: {builder.absolute_name()} built into {os.environ['TORCH_EXTENSIONS_DIR']}")


def fit(loop, config: dict, resources, ctx, rows=None) -> None:
    """Run `loop(config)` on `resources.num_workers` Ray Train workers.

    rows: the stage's training rows (packed rows, or TRL's pair texts), put once in Ray's object
    store and handed to every worker as `config["rows"]`, a reference the worker `ray.get`s: not
    pickled into every worker's config.

    A worker or node lost mid-run: Ray Train (FailureConfig) tears the worker group down and
    starts `loop` again on a new one, up to `resources.max_failures` times; the loop resumes
    from the newest complete `checkpoint-N` under out_dir (save_steps), so finished steps are
    not redone and the logged history continues from the checkpoint's. Only when the failures
    run out does fit raise.
    """
    ctx.ensure_ray()  # the one start of Ray for a training stage
    # More GPU workers than the cluster has would leave Ray Train waiting for them forever:
    # refused now on a fixed cluster, waited for (resources.wait_s) on an autoscaling one.
    claim(ctx.stage, resources, "workers")
    _torch_trainer(loop, job_config(config, resources, ctx, rows), resources, ctx).fit()


def job_config(config: dict, resources, ctx, rows=None) -> dict:
    """`config` plus what every worker of a fit needs from the driver (the rows' object
    reference, the ZeRO dict, the resources the worker acts on)."""
    import ray

    config = dict(config)
    if rows is not None:
        config["rows"] = ray.put(rows)
    # The DeepSpeed comm op is JIT-built once and cached here (prebuild_deepspeed_ops).
    config["torch_extensions_dir"] = torch_extensions_dir()
    config["deepspeed"] = deepspeed_config(resources.zero_stage, resources.offload)
    config["use_gpu"] = resources.use_gpu
    config["cpus_per_worker"] = resources.cpus_per_worker
    if resources.gradient_checkpointing not in ("auto", True, False):
        raise UserError(f"resources.{ctx.stage}.gradient_checkpointing: "
                        f"{resources.gradient_checkpointing!r} (use auto, true or false)")
    config["gradient_checkpointing"] = resources.gradient_checkpointing  # train_packed reads it
    config["sequence_parallel"] = resources.sequence_parallel  # checked by the stage (sft)
    config["stage"] = ctx.stage  # names the progress lines
    return config


def _torch_trainer(loop, config: dict, resources, ctx):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    per_worker = {"CPU": resources.cpus_per_worker}
    if resources.use_gpu:
        per_worker["GPU"] = 1
    return TorchTrainer(
        loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=resources.num_workers,
                                     use_gpu=resources.use_gpu,
                                     resources_per_worker=per_worker,
                                     label_selector=dict(resources.label_selector) or None),
        torch_config=TorchConfig(backend="nccl" if resources.use_gpu else "gloo"),
        run_config=RunConfig(name=f"{ctx.stage}-{ctx.version}",
                             storage_path=ctx.scratch_dir("ray-train"),
                             failure_config=FailureConfig(max_failures=resources.max_failures)),
    )


class TrainGroup:
    """One Ray Train worker group kept up for several fits in a row: a stage that trains many
    times on little data (opd: once per iteration) starts the workers, their imports
    (torch, transformers, DeepSpeed), the process group and DeepSpeed's first initialize once,
    instead of paying them every fit (docs/performance.md: most of a small fit's time).

        group = TrainGroup(loop, resources, ctx)
        group.run(config, rows)      # loop(config + rows) on every worker, as fit(...) does
        group.run(config2, rows2)
        group.close()

    The workers run `group_loop`: take job k from a mailbox actor, run `loop` on it, rank 0
    marks k finished, wait for k + 1. The group starts at the first `run` (Ray Train's
    TorchTrainer.fit, in a driver thread) and ends at `close`. A worker lost mid-job: Ray Train
    restarts the group (resources.max_failures) and the new one takes up the unfinished job,
    where `loop` resumes from its checkpoints as under fit. A group that ends for good (a
    UserError in the loop, the failures used up) makes `run` raise its error, as fit would.
    """

    def __init__(self, loop, resources, ctx):
        self.loop, self.resources, self.ctx = loop, resources, ctx
        self.mailbox = None
        self.thread = None
        self.error = None

    def _start(self) -> None:
        import threading

        import ray

        self.ctx.ensure_ray()
        claim(self.ctx.stage, self.resources, "workers")
        self.mailbox = ray.remote(num_cpus=0)(_Mailbox).remote()
        trainer = _torch_trainer(group_loop, {"loop": self.loop, "mailbox": self.mailbox},
                                 self.resources, self.ctx)

        def serve():
            try:
                trainer.fit()
            except BaseException as e:  # noqa: BLE001 — handed to the driver's run()
                self.error = e

        self.thread = threading.Thread(target=serve, name="train-group", daemon=True)
        self.thread.start()

    def run(self, config: dict, rows=None) -> float:
        """loop(config) on every worker with `rows` as in fit; returns the seconds the job
        waited for the workers to take it (the group's start, for the first job; ~0 after)."""
        import ray

        if self.thread is None:
            self._start()
        if not self.thread.is_alive():
            raise self.error or RuntimeError(f"{self.ctx.stage}: the training group ended")
        k = ray.get(self.mailbox.post.remote(job_config(config, self.resources, self.ctx,
                                                        rows)))
        finished = self.mailbox.wait_finished.remote(k)
        while not ray.wait([finished], timeout=1.0)[0]:
            if not self.thread.is_alive():
                raise self.error or RuntimeError(
                    f"{self.ctx.stage}: the training group ended before its job {k} finished")
        return ray.get(finished)

    def close(self) -> None:
        import ray

        if self.thread is None:
            return
        if self.thread.is_alive():
            ray.get(self.mailbox.post.remote(None))  # the workers' loop returns
            self.thread.join(timeout=120)
        ray.kill(self.mailbox)
        self.thread = None


class _Mailbox:
    """A TrainGroup's jobs, in order (a Ray async actor): the driver posts, the workers take."""

    def __init__(self):
        import asyncio

        self.jobs, self.posted, self.taken = [], [], {}
        self.finished = -1
        self.changed = asyncio.Condition()

    async def post(self, job) -> int:
        async with self.changed:
            self.jobs.append(job)
            self.posted.append(time.monotonic())
            self.changed.notify_all()
            return len(self.jobs) - 1

    def next_job(self) -> int:
        """The first unfinished job: where a restarted group takes up the work."""
        return self.finished + 1

    async def take(self, k: int):
        async with self.changed:
            await self.changed.wait_for(lambda: len(self.jobs) > k)
            self.taken.setdefault(k, time.monotonic())
            return self.jobs[k]

    async def finish(self, k: int) -> None:
        async with self.changed:
            self.finished = max(self.finished, k)
            # its rows' reference goes: every worker has returned from it (group_loop's barrier)
            # and a restarted group starts at the next one
            self.jobs[k] = {}
            self.changed.notify_all()

    async def wait_finished(self, k: int) -> float:
        async with self.changed:
            await self.changed.wait_for(lambda: self.finished >= k)
            return self.taken.get(k, self.posted[k]) - self.posted[k]


def group_loop(config: dict) -> None:
    """A TrainGroup worker: its jobs in order, each `config["loop"](job)`, until a None job.
    Job k is finished when every worker has returned from it (a barrier, then rank 0 says so):
    never while one is still on it, whatever the loop synchronises itself."""
    import ray
    import ray.train
    import torch.distributed as dist

    mailbox, loop = config["mailbox"], config["loop"]
    k = ray.get(mailbox.next_job.remote())
    while True:
        job = ray.get(mailbox.take.remote(k))
        if job is None:
            return
        loop(job)
        if dist.is_initialized():
            dist.barrier()
        if ray.train.get_context().get_world_rank() == 0:
            ray.get(mailbox.finish.remote(k))
        k += 1


# --- inside a worker -------------------------------------------------------------------------

def worker_env(config: dict) -> None:
    """Process settings every worker needs before torch/deepspeed do real work."""
    import torch

    os.environ["TORCH_EXTENSIONS_DIR"] = config["torch_extensions_dir"]
    # TensorBoard event files go into the version folder (<version>/logs), not the checkpoints
    # folder that is deleted at the end.
    os.environ["TENSORBOARD_LOGGING_DIR"] = os.path.join(config["out_dir"], "logs")
    if not config["use_gpu"]:
        torch.set_num_threads(max(1, int(config["cpus_per_worker"])))


def deepspeed_for_worker(config: dict) -> dict:
    """A fresh copy of the ZeRO dict; ZeRO-3 needs the process group in DeepSpeed's hands before
    `from_pretrained` (zero.Init partitions at load time; docs/stack.md: it asserts otherwise)."""
    ds = copy.deepcopy(config["deepspeed"])
    if ds["zero_optimization"]["stage"] == 3:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if config["use_gpu"] else "gloo")
    return ds


def progress_callback(stage: str):
    """A transformers TrainerCallback: live progress of the optimizer steps on rank 0 (a bar on a
    terminal, plain lines in a Ray job's logs; pipeline/progress.py). A resumed run starts at
    the checkpoint's step."""
    from transformers import TrainerCallback

    class StepProgress(TrainerCallback):
        progress = None
        tokens = 0

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.progress = Progress(stage, total=state.max_steps, unit="steps",
                                         done=state.global_step, errors=False,
                                         tokens_label="train tok/s")
                self.tokens = state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                # num_input_tokens_seen is gathered over every worker: the whole group's rate.
                self.progress.update(1, tokens=state.num_input_tokens_seen - self.tokens)
                self.tokens = state.num_input_tokens_seen

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.close()

    return StepProgress()


def last_checkpoint(checkpoint_dir: str) -> str | None:
    """The newest complete `checkpoint-N` folder of an interrupted run, or None.

    The Trainer writes trainer_state.json last; a folder without it was cut off mid-save.
    """
    if not os.path.isdir(checkpoint_dir):
        return None
    done = [name for name in os.listdir(checkpoint_dir)
            if re.fullmatch(r"checkpoint-\d+", name)
            and os.path.exists(os.path.join(checkpoint_dir, name, "trainer_state.json"))]
    if not done:
        return None
    return os.path.join(checkpoint_dir, max(done, key=lambda n: int(n.split("-")[1])))


def peak_memory_mb(use_gpu: bool) -> float:
    """Peak memory of this worker: CUDA allocator peak on GPU, the process's max RSS on CPU."""

    import torch

    if use_gpu:
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB -> MiB


def finish(trainer, tokenizer, out_dir: str, checkpoint_dir: str, stats: dict) -> None:
    """Write the HF checkpoint (model + tokenizer + chat template) and the run's stats.

    `save_model` is collective under ZeRO-3 (the shards are gathered), so every rank calls it;
    only rank 0 writes files.
    """
    trainer.save_model(out_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(out_dir)
        with open(os.path.join(out_dir, "train_stats.json"), "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=1)
        # Optimizer state and DeepSpeed shards exist for resuming an interrupted run only.
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
