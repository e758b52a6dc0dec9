"""Submit a distillery command to a Ray cluster as a Ray job.

    export RAY_ADDRESS=http://head-node:8265        # the cluster's dashboard / job address
    python -m cluster.submit -- run all --recipe configs/recipe.yaml data_root=s3://bucket/run1

runs `ray job submit --runtime-env cluster/runtime_env.yaml -- python -m pipeline.cli run all …` on the
cluster. Inside the job RAY_ADDRESS is set by Ray, so every stage joins the cluster — the same
code path as a laptop run (DESIGN.md rule 4). The data root must be storage every node sees
(a shared filesystem or an fsspec URL such as s3://…).

Ray 2.60's `ray start` turns token authentication on; `ray job submit` reads the token from
~/.ray/auth_token (copy it from the head node) — keep auth on.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def submit_command(address: str, distillery_args: list[str], no_wait: bool = False) -> list[str]:
    cmd = ["ray", "job", "submit", "--address", address,
           "--runtime-env", os.path.join(HERE, "runtime_env.yaml")]
    if no_wait:
        cmd.append("--no-wait")
    # `python -m pipeline.cli`: the code comes with the working dir, the packages from the
    # cluster's Python environment (install distillery's dependencies on the nodes).
    return cmd + ["--", "python", "-m", "pipeline.cli", *distillery_args]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.submit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS", ""),
                   help="Ray job address (default $RAY_ADDRESS)")
    p.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then distillery's arguments")
    a = p.parse_args(argv)
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    if not a.address:
        print("error: no Ray address: set RAY_ADDRESS or pass --address", file=sys.stderr)
        return 2
    if not args:
        print("error: nothing to submit: add `-- run STAGE --recipe FILE`", file=sys.stderr)
        return 2
    cmd = submit_command(a.address, args, a.no_wait)
    print("+", shlex.join(cmd), flush=True)
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
