"""The scoring runner: transformers models held by a Ray Data actor pool, GPU or CPU.

"How it runs", not "what it computes" (docs/architecture.md): the stage hands over a Ray Dataset,
the models to load by name, and its per-batch function `score_fn(models, batch) -> batch`, where
`models` is {name: (model, tokenizer)}; it gets the scored rows back. Beside cluster/inference.py's
sampling runner (vLLM) — scoring is one teacher-forcing forward per text, not generation, so a
plain transformers model running the stage's packed forward is the tool.

`resources.<stage>` decides the pool: `replicas` actors, each with `gpus_per_replica` GPUs
(0 = CPU, fp32) and `cpus_per_replica` CPUs; every actor loads all the named models once
(teacher + student: 7B + 1.5B in bf16 = 17 GB on one 80 GB GPU).

    from cluster.scoring import score_batches
    out = score_batches(ds, models={"teacher": t, "student": s}, score_fn=fn,
                        resources=ctx.resources, ctx=ctx, batch_size=256)
"""
from __future__ import annotations

import os

from pipeline.resources import claim, placement


class _Scorer:
    """One pool actor: loads the models once, then calls the stage's function on each batch."""

    def __init__(self, models: dict, score_fn, prepare, cpu_model_hook, attn_implementation: str,
                 use_gpu: bool, threads: int, trust_remote_code: bool):
        import torch

        if prepare is not None:
            prepare()  # e.g. register the stage's attention function in this process
        if not use_gpu:
            torch.set_num_threads(threads)
        self.settings = (cpu_model_hook, attn_implementation, use_gpu, trust_remote_code)
        self.paths = dict(models)
        self.models = {name: self._load(path) for name, path in models.items()}
        self.score_fn = score_fn

    def _load(self, path: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cpu_model_hook, attn_implementation, use_gpu, trust_remote_code = self.settings
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16 if use_gpu else torch.float32,
            attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = model.to("cuda" if use_gpu else "cpu").eval()
        if cpu_model_hook is not None and not use_gpu:
            model = cpu_model_hook(model)
        return model, tokenizer

    def load(self, models: dict) -> None:
        """WarmScorers: each model whose path changed is loaded from its new path; the others
        are kept (the teacher, while the student's checkpoint changes each round)."""
        for name, path in models.items():
            if self.paths.get(name) != path:
                self.models[name] = self._load(path)
                self.paths[name] = path

    def score(self, models: dict, batch):
        """WarmScorers: the batch scored with `models` (a restarted actor loads them first)."""
        self.load(models)
        return self(batch)

    def __call__(self, batch):
        import torch

        with torch.inference_mode():
            return self.score_fn(self.models, batch)


def _pool_settings(r) -> tuple[bool, int, dict]:
    """(use_gpu, torch threads per actor, runtime_env) of a scoring pool. CPU: the replicas of
    one node share its cores (2 cores, 1 replica: 2 torch threads); Ray exports
    OMP_NUM_THREADS = num_cpus (1) to actors, so set it to the same count."""
    use_gpu = r.gpus_per_replica > 0
    threads = max(1, (os.cpu_count() or 1) // r.replicas)
    return use_gpu, threads, {} if use_gpu else {"env_vars": {"OMP_NUM_THREADS": str(threads)}}


def score_batches(ds, *, models: dict, score_fn, resources, ctx, batch_size: int,
                  prepare=None, cpu_model_hook=None, attn_implementation: str = "sdpa",
                  trust_remote_code: bool = False):
    """`score_fn(models, batch)` over every batch of `ds` (pyarrow batches of `batch_size` rows)
    on `resources.replicas` actors. Returns the lazy Ray Dataset of what score_fn returned.

    models: {name: model path or hub id}, all loaded by every actor.
    prepare: a no-argument function run in each actor before loading (module-level, picklable).
    cpu_model_hook: model -> model, applied to each loaded model when the pool runs on CPU
      (e.g. stages/lib/packed.py's onednn_linears).
    """
    import ray.data

    # Ray is up: `ds` is a Ray Dataset, and whoever made it started Ray (ctx.ensure_ray).
    r = resources
    claim(ctx.stage, r, "engines")  # refused (fixed cluster) or waited for (autoscaler) now
    use_gpu, threads, env = _pool_settings(r)
    return ds.map_batches(
        _Scorer, batch_size=batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=r.replicas),
        num_cpus=r.cpus_per_replica, num_gpus=r.gpus_per_replica or None, runtime_env=env,
        fn_constructor_kwargs=dict(models=models, score_fn=score_fn, prepare=prepare,
                                   cpu_model_hook=cpu_model_hook,
                                   attn_implementation=attn_implementation, use_gpu=use_gpu,
                                   threads=threads, trust_remote_code=trust_remote_code),
        # Restarts and retries on a lost node: Ray Data's actor-pool defaults (resources.py).
        **placement(r))


class WarmScorers:
    """Scoring actors that stay up between calls, for a loop that scores each round with a new
    checkpoint of one of its models (opd: the student's; the teacher stays loaded):
    `resources.replicas` actors, each loading every model of `models` once; `load(name, path)`
    puts another checkpoint in place of one model in the running actors; `score(table)` is
    score_batches over the table with one batch per actor, the rows split evenly, in order.

    Saves each round an actor process, its imports and every unchanged model's load. Actors
    that die are restarted by Ray with their first models and their calls retried; every
    `score` call names the current models, so a restarted actor loads them before it scores.
    CPU actors reserve no Ray CPUs while they wait (Train workers need those cores in
    between), as cluster/inference.py WarmEngines; `claim` still checks the cluster holds
    them. GPU actors keep their GPUs.
    """

    def __init__(self, models: dict, *, score_fn, resources, ctx, prepare=None,
                 cpu_model_hook=None, attn_implementation: str = "sdpa",
                 trust_remote_code: bool = False):
        import ray

        r = resources
        claim(ctx.stage, r, "engines")
        use_gpu, threads, env = _pool_settings(r)
        actor = ray.remote(_Scorer).options(
            max_restarts=-1, max_task_retries=-1, runtime_env=env,
            num_cpus=r.cpus_per_replica if use_gpu else 0, num_gpus=r.gpus_per_replica,
            **placement(r))
        self.models = dict(models)
        self.actors = [actor.remote(self.models, score_fn, prepare, cpu_model_hook,
                                    attn_implementation, use_gpu, threads, trust_remote_code)
                       for _ in range(r.replicas)]
        ray.get([a.load.remote(self.models) for a in self.actors])  # every actor is up

    def load(self, name: str, path: str) -> None:
        """Every actor scores with `path` as model `name` from now on."""
        import ray

        self.models[name] = path
        ray.get([a.load.remote(self.models) for a in self.actors])

    def score(self, table):
        """score_fn over `table` (pyarrow), the rows split evenly over the actors, in order."""
        import pyarrow as pa
        import ray

        share = max(1, -(-table.num_rows // len(self.actors)))
        parts = [table.slice(k, share) for k in range(0, table.num_rows, share)] or [table]
        return pa.concat_tables(ray.get([a.score.remote(self.models, part)
                                         for a, part in zip(self.actors, parts)]))

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []
