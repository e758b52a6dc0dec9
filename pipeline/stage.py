"""The stage record and the context a stage runs in.

A stage is a plain record (DESIGN.md, "The stage contract"): no base class, no registry.
`stages/__init__.py` holds the explicit `STAGES = {...}` dict in pipeline order.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Stage:
    name: str                      # also its folder under the data root
    config: type                   # a dataclass; its fields are the stage's knobs
    reads: tuple[str, ...]         # upstream stages whose versions it consumes, in order
    requires: tuple[str, ...]      # columns it needs on its first input (checked before run)
    adds: tuple[str, ...]          # columns it promises on its output (checked after run)
    # run(cfg, inputs, ctx) -> one of
    #   ray.data.Dataset          : the runner writes it as part-*.parquet
    #   pyarrow.Table             : the same, for small stages that need no Ray (ingest)
    #   {split: ray.data.Dataset} : the runner writes each under <version>/<split>/
    #   None                      : the stage wrote its own files into ctx.out_dir
    #                               (resumable shards, or a model checkpoint)
    run: Callable[[Any, dict, "Context"], Any]
    output: str = "dataset"        # "dataset" or "model" (a Hugging Face checkpoint folder)
    # True: ctx.out_dir survives a crash and a rerun of the same version finds the shards it
    # already finished there (generate). False: the runner empties it before run.
    resumable: bool = False


@dataclass
class Context:
    """What a stage may use besides its config and its inputs."""

    stage: str
    version: str
    out_dir: str                   # temporary version folder; renamed into place on success
    data_root: str
    teacher: str                   # the recipe's teacher (hub id or local path)
    student: str                   # the recipe's student
    resources: Any                 # cluster.resources.StageResources for this stage ("where")
    stats: dict = field(default_factory=dict)             # -> manifest["stats"]
    drops: collections.Counter = field(default_factory=collections.Counter)  # reason -> rows
    rows_in: int | None = None     # rows of the first input (set by the runner)

    def ensure_ray(self) -> None:
        """Start a local Ray on demand, or join the cluster named by RAY_ADDRESS (same code)."""
        ensure_ray()

    def scratch_dir(self, name: str) -> str:
        """A per-run scratch folder outside the dataset (engine sockets, compile caches)."""
        path = os.path.join(tempfile.gettempdir(), "distillery", self.stage, self.version, name)
        os.makedirs(path, exist_ok=True)
        return path


def ensure_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)  # joins that cluster
        return
    # A fresh temp dir per local run: a `ray stop`-ed cluster leaves ray_current_cluster behind
    # in the default one and a later ray.init() then tries to connect to it (STACK.md).
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir=os.environ.get("DISTILLERY_RAY_TMP", "/tmp"))
    ray.init(include_dashboard=False, _temp_dir=temp_dir, log_to_driver=True)


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
