"""cluster/train.py TrainGroup: one Ray Train worker group (real Ray Train, gloo) serving
several jobs in a row, as opd's iterations use it. The loops here train nothing: they record
which process ran which job, raise, or die."""
from __future__ import annotations

import json
import os

import pytest

from pipeline.cli import user_error_inside
from pipeline.errors import UserError
from pipeline.resources import StageResources
from pipeline.stage import Context


def _group(tmp_path, loop, **resources):
    from cluster.train import TrainGroup

    r = StageResources(num_workers=2, cpus_per_worker=1, **resources)
    ctx = Context(stage="opd", version="group-test", out_dir=str(tmp_path / "out"),
                  data_root=str(tmp_path / "data"), teacher="", student="", resources=r)
    return TrainGroup(loop, r, ctx)


def _loops():
    """The workers' loops, made here so Ray pickles them by value (a worker cannot import
    this test module): record (each worker writes which job it ran, in which process, with how
    many rows), refuse_second (a UserError in job 1), die_once (rank 1's process dies in job 1
    the first time: a lost worker; then the job runs)."""

    def record(config):
        import ray
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        with open(os.path.join(config["out"], f"job{config['job']}-rank{rank}.json"), "w") as f:
            json.dump({"pid": os.getpid(), "rows": len(ray.get(config["rows"]))}, f)

    def refuse_second(config):
        if config["job"] == 1:
            raise UserError("opd: iteration 1: no sample has a completion token (from a worker)")
        record(config)

    def die_once(config):
        import ray.train

        marker = os.path.join(config["out"], "died")
        if config["job"] == 1 and ray.train.get_context().get_world_rank() == 1 \
                and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        record(config)

    return record, refuse_second, die_once


def _read(out, job, rank):
    with open(os.path.join(out, f"job{job}-rank{rank}.json")) as f:
        return json.load(f)


def test_jobs_run_in_order_on_the_same_worker_processes(ray_cluster, tmp_path):
    out = str(tmp_path)
    group = _group(tmp_path, _loops()[0])
    try:
        waited = [group.run({"out": out, "job": k}, rows=[{"x": 1}] * (k + 1)) for k in range(3)]
    finally:
        group.close()
    runs = [[_read(out, k, rank) for rank in (0, 1)] for k in range(3)]
    # every job ran on both workers with its own rows, in the processes the first job started
    assert [[r["rows"] for r in job] for job in runs] == [[1, 1], [2, 2], [3, 3]]
    assert {r["pid"] for r in (job[0] for job in runs)} == {runs[0][0]["pid"]}
    assert {r["pid"] for r in (job[1] for job in runs)} == {runs[0][1]["pid"]}
    assert runs[0][0]["pid"] != runs[0][1]["pid"]
    # the first job waited for the group to start; the later ones found it waiting
    assert waited[0] > 1.0 and max(waited[1:]) < 0.5
    assert group.thread is None  # closed: the workers' loop returned


def test_a_user_error_in_a_job_reaches_the_driver(ray_cluster, tmp_path):
    """The group ends with the job's error (after resources.max_failures restarts, here none):
    run raises it, and the CLI's exit-2 path finds the message inside."""
    group = _group(tmp_path, _loops()[1], max_failures=0)
    try:
        group.run({"out": str(tmp_path), "job": 0}, rows=[{}])
        with pytest.raises(Exception) as raised:
            group.run({"out": str(tmp_path), "job": 1}, rows=[{}])
    finally:
        group.close()
    assert user_error_inside(raised.value) == \
        "opd: iteration 1: no sample has a completion token (from a worker)"


@pytest.mark.slow
def test_a_lost_worker_restarts_the_group_which_takes_up_the_unfinished_job(ray_cluster,
                                                                             tmp_path):
    out = str(tmp_path)
    group = _group(tmp_path, _loops()[2], max_failures=1)
    try:
        for k in range(3):
            group.run({"out": out, "job": k}, rows=[{}])
    finally:
        group.close()
    assert os.path.exists(os.path.join(out, "died"))
    # job 1 finished on the restarted group (new processes), job 2 ran there too
    assert _read(out, 1, 1)["pid"] != _read(out, 0, 1)["pid"]
    assert _read(out, 2, 0)["pid"] == _read(out, 1, 0)["pid"]
    assert all(os.path.exists(os.path.join(out, f"job{k}-rank{r}.json"))
               for k in range(3) for r in (0, 1))
