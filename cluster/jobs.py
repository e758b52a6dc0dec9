"""Run distillery on a Ray cluster as a Ray job, and look after the jobs — Ray's Job SDK.

    distillery submit all --recipe configs/recipe.yaml --address http://head:8265 \\
        data_root=s3://bucket/run1
    distillery jobs list | status ID | logs ID [--follow] | stop ID

`submit` ships this repository (cluster/deploy/runtime_env.yaml: the code, never .venv or data) and
runs `python -m pipeline.cli run STAGE …` as the job's entrypoint. Inside the job Ray sets
RAY_ADDRESS, so every stage joins the cluster — the same code path as a laptop run
(docs/architecture.md, "Ray: local or cluster"). The logs stream back until the job ends; the exit
code is the job's (2 for a user error, as on a laptop).

Token authentication (Ray 2.60's `ray start` default) stays on: the client sends the token the
way `ray job submit` does — with RAY_AUTH_MODE=token it reads $RAY_AUTH_TOKEN, the file named by
$RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token (copy it from the head node: `ray get-auth-token`).
"""
from __future__ import annotations

import asyncio
import datetime as dt
import os
import shlex

import yaml

from pipeline.errors import UserError

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# What `jobs` prints per job, in this order.
JOB_FIELDS = ("submission_id", "status", "entrypoint", "start_time", "end_time", "message")


def client(address: str):
    """A JobSubmissionClient for `address` (default: $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    if address:
        # The SDK lets $RAY_ADDRESS override its `address` argument (as ray.init does); an
        # explicit --address must win, and RAY_API_SERVER_ADDRESS is the variable it reads first.
        os.environ["RAY_API_SERVER_ADDRESS"] = address
    elif not (os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")):
        raise UserError("no Ray cluster address: pass --address http://HEAD:8265 or set "
                        "RAY_ADDRESS")
    try:
        return JobSubmissionClient(address or None)
    except AuthenticationError as e:
        raise UserError(f"the Ray cluster refused the token: {e}") from None
    except ConnectionError as e:
        raise UserError(f"cannot reach the Ray job server at "
                        f"{address or os.environ.get('RAY_ADDRESS')}: {e}") from None


def runtime_env() -> dict:
    """cluster/deploy/runtime_env.yaml, its working_dir resolved against the repository root."""
    with open(os.path.join(HERE, "deploy", "runtime_env.yaml"), encoding="utf-8") as f:
        env = yaml.safe_load(f)
    env["working_dir"] = os.path.normpath(os.path.join(REPO, env["working_dir"]))
    return env


def entrypoint(stage: str, recipe: str, items: list[str], shared_fs: bool) -> str:
    """The job's command line. A recipe inside the repository is named relative to it (the job
    runs in the uploaded copy); one outside must be on storage the head node sees."""
    path = os.path.abspath(recipe)
    if os.path.commonpath([path, REPO]) == REPO:
        path = os.path.relpath(path, REPO)
    args = ["python", "-m", "pipeline.cli", "run", stage, "--recipe", path]
    if shared_fs:
        args.append("--shared-fs")
    return shlex.join(args + list(items))


def submit(address: str, stage: str, recipe: str, items: list[str], no_wait: bool,
           shared_fs: bool, log=print) -> int:
    """Submit the job; unless no_wait, stream its logs and return its exit code."""
    if not os.path.exists(recipe):
        raise UserError(f"recipe {recipe}: file not found")
    c = client(address)
    command = entrypoint(stage, recipe, items, shared_fs)
    job_id = c.submit_job(entrypoint=command, runtime_env=runtime_env())
    log(f"submitted {job_id}: {command}", flush=True)
    if no_wait:
        log(f"follow it with `distillery jobs logs {job_id} --follow`", flush=True)
        return 0
    return follow(c, job_id, log)


def follow(c, job_id: str, log=print) -> int:
    """Print the job's logs as they come until it ends; 0 if it succeeded, else its driver's
    exit code (1 when it has none: stopped, or lost with its node)."""

    from ray.job_submission import JobStatus

    async def tail():
        async for lines in c.tail_job_logs(job_id):
            log(lines, end="", flush=True)

    asyncio.run(tail())
    info = c.get_job_info(job_id)
    log(f"job {job_id} {info.status.value.lower()}"
        + (f": {info.message}" if info.status != JobStatus.SUCCEEDED and info.message else ""),
        flush=True)
    if info.status == JobStatus.SUCCEEDED:
        return 0
    return info.driver_exit_code or 1


def jobs(address: str, action: str, job_id: str | None, follow_logs: bool, log=print) -> int:
    """`distillery jobs list | status ID | logs ID | stop ID`."""
    if action != "list" and not job_id:
        raise UserError(f"distillery jobs {action}: which job? (distillery jobs {action} ID; "
                        "`distillery jobs list` shows them)")
    c = client(address)

    def when(ms):
        return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%S") if ms else "-"

    if action == "list":
        for j in sorted(c.list_jobs(), key=lambda j: j.start_time or 0):
            log(f"{j.submission_id or j.job_id:<32} {j.status.value:<9} {when(j.start_time)}  "
                f"{j.entrypoint}")
        return 0
    try:
        if action == "status":
            info = c.get_job_info(job_id)
            for name in JOB_FIELDS:
                value = getattr(info, name)
                log(f"{name:<14} {when(value) if name.endswith('_time') else value}")
            log(f"{'exit_code':<14} {info.driver_exit_code}")
            return 0
        if action == "logs":
            if follow_logs:
                return follow(c, job_id, log)
            log(c.get_job_logs(job_id), end="")
            return 0
        stopped = c.stop_job(job_id)  # stop: SIGTERM to the driver, SIGKILL after a grace time
        log(f"{job_id}: {'stop requested' if stopped else 'already finished'}")
        return 0
    except RuntimeError as e:
        if "does not exist" in str(e):
            raise UserError(f"no job {job_id} on this cluster (`distillery jobs list`)") from None
        raise
