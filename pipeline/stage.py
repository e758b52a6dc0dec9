"""The stage record and the context a stage runs in.

A stage is a plain record (docs/architecture.md, "The stage contract"): no base class, no registry.
`stages/__init__.py` holds the explicit `STAGES = {...}` dict in pipeline order.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.errors import UserError


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
    # uses(cfg) -> the names of `reads` this config reads (None: all of them). evaluate of
    # checkpoint paths alone needs no sft or redi version.
    uses: Callable[[Any], set] | None = None


@dataclass
class Context:
    """What a stage may use besides its config and its inputs."""

    stage: str
    version: str
    out_dir: str                   # temporary version folder; renamed into place on success
    data_root: str
    teacher: str                   # the recipe's teacher (hub id or local path)
    student: str                   # the recipe's student
    resources: Any                 # pipeline.resources.StageResources for this stage ("where")
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
    # in the default one and a later ray.init() then tries to connect to it (docs/stack.md).
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir=os.environ.get("DISTILLERY_RAY_TMP", "/tmp"))
    ray.init(include_dashboard=False, _temp_dir=temp_dir, log_to_driver=True)


def check_storage(data_root: str) -> None:
    """Refuse a local data_root on a Ray cluster of more than one node, before any work.

    Every node reads the inputs and writes shards/checkpoints under data_root: a folder on the
    driver's disk is invisible to the others (a worker on node 2 would write into its own,
    unseen copy). Fine: an fsspec URL (s3://, gs://), a single-node Ray (a laptop, one big box),
    or a shared filesystem mounted at the same path everywhere (`--shared-fs`, which sets
    DISTILLERY_SHARED_FS=1). Only a run joining a cluster (RAY_ADDRESS, as inside a Ray job)
    is checked: a local Ray started on demand is one node.
    """
    if "://" in data_root and not data_root.startswith("file://"):
        return
    if os.environ.get("DISTILLERY_SHARED_FS") == "1" or not os.environ.get("RAY_ADDRESS"):
        return
    import ray

    ensure_ray()
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) > 1:
        raise UserError(
            f"data_root {data_root} is a local folder, but this Ray cluster has {len(nodes)} "
            "nodes and the others cannot see it. Use storage every node sees: an object store "
            "URL via fsspec (data_root=s3://bucket/run or gs://bucket/run; install s3fs or "
            "gcsfs), or a shared filesystem (NFS) mounted at the same path on every node, "
            "declared with --shared-fs (or DISTILLERY_SHARED_FS=1).")


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
