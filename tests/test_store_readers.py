"""A version folder (and a split folder) opens with the usual Parquet readers, as it is on disk.

The manifest is `.manifest.json`: pyarrow, pandas, `datasets` and Ray Data all skip `.` files when
they list a folder (`datasets` does not skip `_` files). With the old name `manifest.json` they
failed with "Parquet magic bytes not found". Versions written under the old name are still read.
"""
from __future__ import annotations

import glob
import json
import os
import textwrap
from dataclasses import dataclass

import pyarrow as pa
import pytest

from pipeline.config import load_recipe
from pipeline.runner import run_stage
from pipeline.stage import Stage
from pipeline.store import LEGACY_MANIFEST, MANIFEST, Store


@dataclass
class RowsConfig:
    """n: rows to make."""

    n: int = 5


def _flat(cfg, inputs, ctx):
    return pa.table({"i": list(range(cfg.n)), "text": [f"row {i}" for i in range(cfg.n)]})


def _split(cfg, inputs, ctx):
    return {"train": pa.table({"i": list(range(cfg.n))}),
            "pairs": pa.table({"prompt": ["p"] * 2, "chosen": ["a", "b"]})}


STAGES = {"flat": Stage("flat", RowsConfig, (), (), ("i",), _flat),
          "split": Stage("split", RowsConfig, (), (), (), _split)}


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    root = tmp_path_factory.mktemp("readers")
    recipe_path = root / "recipe.yaml"
    recipe_path.write_text(textwrap.dedent(f"""
        data_root: {root / 'data'}
        stages: [flat, split]
    """))
    recipe = load_recipe(str(recipe_path), [], STAGES)
    flat = run_stage("flat", recipe, log=lambda *_: None)
    split = run_stage("split", recipe, log=lambda *_: None)
    assert os.path.exists(os.path.join(flat.path, MANIFEST))
    assert not os.path.exists(os.path.join(flat.path, LEGACY_MANIFEST))
    return flat.path, os.path.join(split.path, "train")


def test_pandas_and_pyarrow_open_the_folders(versions):
    import pandas as pd
    import pyarrow.parquet as pq

    flat, train = versions
    assert sorted(pd.read_parquet(flat)["i"]) == [0, 1, 2, 3, 4]
    assert pq.read_table(flat).num_rows == 5
    assert pq.read_table(flat).column_names == ["i", "text"]
    assert sorted(pd.read_parquet(train)["i"]) == [0, 1, 2, 3, 4]
    assert pq.read_table(train).num_rows == 5


def test_datasets_opens_the_folders(versions, tmp_path):
    import datasets

    flat, train = versions
    cache = str(tmp_path / "hf-cache")
    # Before: "Could not read schema from .../manifest.json ... Parquet magic bytes not found".
    by_dir = datasets.load_dataset("parquet", data_dir=flat, split="train", cache_dir=cache)
    assert sorted(by_dir["i"]) == [0, 1, 2, 3, 4]
    by_files = datasets.load_dataset("parquet", data_files=os.path.join(flat, "*"),
                                     split="train", cache_dir=cache)
    assert sorted(by_files["text"]) == [f"row {i}" for i in range(5)]
    split_dir = datasets.load_dataset("parquet", data_dir=train, split="train", cache_dir=cache)
    assert split_dir.num_rows == 5


def test_ray_data_opens_the_folders(versions, ray_cluster):
    import ray.data

    flat, train = versions
    assert sorted(r["i"] for r in ray.data.read_parquet(flat).take_all()) == [0, 1, 2, 3, 4]
    assert ray.data.read_parquet(train).count() == 5


def test_duckdb_opens_the_folders(versions):
    duckdb = pytest.importorskip("duckdb", reason="duckdb is not installed in this venv "
                                 "(pyproject lists it; run `make install`)")
    flat, train = versions
    assert duckdb.sql(f"select count(*) from read_parquet('{flat}/*.parquet')").fetchall() == [(5,)]
    assert duckdb.sql(f"select sum(i) from '{train}/*.parquet'").fetchall() == [(10,)]


def test_a_version_written_with_the_legacy_name_is_still_read(versions, tmp_path):
    import shutil

    flat, _ = versions
    stage_dir = tmp_path / "data" / "flat"
    old = stage_dir / os.path.basename(flat)
    shutil.copytree(flat, old)
    os.rename(old / MANIFEST, old / LEGACY_MANIFEST)
    (stage_dir / "LATEST").write_text(old.name + "\n")
    store = Store(str(tmp_path / "data"))
    found = store.resolve("flat")
    assert found.version == old.name and found.rows == 5
    assert found.read_table().num_rows == 5
    assert [v.version for v in store.versions("flat")] == [old.name]
    # A folder with neither name is incomplete and stays invisible.
    os.remove(old / LEGACY_MANIFEST)
    assert store.latest("flat") is None and store.versions("flat") == []
    assert json.loads((open(os.path.join(flat, MANIFEST)).read()))["rows_out"] == 5
    assert glob.glob(os.path.join(flat, "part-*.parquet"))
