r"""Benchmark: generate with 1 vs 2 engine replicas on a local 2-node Ray cluster (CPU).

    .venv/bin/python bench/cluster_generate.py                       # tiny model, defaults
    .venv/bin/python bench/cluster_generate.py --problems 512 --max-tokens 256

A SIMULATION OF SCALING, not a measurement of it: both Ray nodes (cluster/two_node_testbed.py: a head and a
second node, 2 logical CPUs each) run on this one machine and share its cores. Each engine asks
for 2 CPUs, so Ray places the 2-replica run's engines one per node (as on two real machines),
but on a 2-core box they divide the same cores: the ratio shows what the distribution costs
or gains here (actor pool, shard routing, two engines' overhead), not what a second GPU node
would add. On a real cluster, run the stage itself with resources.generate.replicas=N.

(a) stock: one plain `LLM.generate` script, same prompts, sampling and model (bench/generate.py
    --raw, its own process), for the ratio against the stock tool;
(b1) `distillery run generate` joined to the 2-node cluster (RAY_ADDRESS), replicas=1;
(b2) the same, replicas=2 (one engine per node).
Prints output tok/s of each in steady state (the stage's first shard excluded: engine start)
and end to end, and the ratios b2/b1 and b/a.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def stock(args) -> dict:
    """(a) bench/generate.py's plain script, in its own process."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "generate.py"), "--raw",
                           "--no-n8", "--model", args.model, "--problems", str(args.problems),
                           "--n", str(args.n), "--max-tokens", str(args.max_tokens),
                           "--max-model-len", str(args.max_model_len)],
                          capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"stock run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def stage(args, nodes, replicas: int) -> dict:
    """(b) the generate stage, its driver joined to the 2-node cluster, `replicas` engines."""
    data = tempfile.mkdtemp(prefix=f"bench-cluster-{replicas}-")
    common = [f"data_root={data}", f"teacher={args.model}", "prompts.path=synthetic",
              f"prompts.synthetic_n={args.problems}", f"generate.n={args.n}",
              f"generate.max_tokens={args.max_tokens}", "generate.temperature=1.0",
              "generate.top_p=0.95", f"generate.shard_size={args.shard_size}",
              f"generate.max_model_len={args.max_model_len}",
              "resources.generate.enforce_eager=true",
              f"resources.generate.replicas={replicas}",
              # 2 CPUs an engine = a whole node: 2 replicas land one per node.
              "resources.generate.cpus_per_replica=2"]
    env = dict(nodes.env, RAY_ADDRESS=f"127.0.0.1:{nodes.gcs}", DISTILLERY_SHARED_FS="1")
    for name in ("prompts", "generate"):
        started = time.time()
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", name, "--recipe",
                               os.path.join(REPO, "configs", "tiny.yaml"), *common],
                              cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    wall = time.time() - started
    from pipeline.store import Store

    stats = Store(data).latest("generate").manifest["stats"]
    return dict(tokens=stats["this_run_output_tokens"], wall=wall,
                steady=stats["steady_output_tok_per_s"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="teacher (default: build the tiny model)")
    p.add_argument("--problems", type=int, default=256)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=512)
    args = p.parse_args()
    if not args.model:
        from pipeline.apps.tiny_model import build_tiny_model

        args.model = build_tiny_model(tempfile.mkdtemp(prefix="bench-tiny-"))

    from cluster.two_node_testbed import TwoNodes

    a = stock(args)
    nodes = TwoNodes(num_cpus=2)
    try:
        b1 = stage(args, nodes, replicas=1)
        b2 = stage(args, nodes, replicas=2)
    finally:
        nodes.teardown()

    a_tps, a_e2e = a["tokens"] / a["secs"], a["tokens"] / a["end_to_end_secs"]
    work = f"{args.problems} prompts x n={args.n} x max {args.max_tokens} tokens"
    print(f"\n== generate on a local 2-node Ray cluster (ONE machine, {os.cpu_count()} cores: "
          f"a simulation of scaling): {work}, shards of {args.shard_size}")
    print(f"(a)  stock LLM.generate, one process  steady {a_tps:8.0f} out tok/s   "
          f"end to end {a_e2e:8.0f} out tok/s")
    for name, b in (("(b1) stage, 1 replica ", b1), ("(b2) stage, 2 replicas", b2)):
        e2e = b["tokens"] / b["wall"]
        steady = b["steady"] or 0.0
        print(f"{name}               steady {steady:8.0f} out tok/s   "
              f"end to end {e2e:8.0f} out tok/s   b/a steady {steady / a_tps:.3f}   "
              f"({b['wall']:.1f} s)")
    b1_e2e, b2_e2e = b1["tokens"] / b1["wall"], b2["tokens"] / b2["wall"]
    print(f"2 vs 1 replicas: steady {(b2['steady'] or 0) / (b1['steady'] or 1):.3f}   "
          f"end to end {b2_e2e / b1_e2e:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
