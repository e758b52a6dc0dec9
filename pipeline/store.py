"""Versioned datasets on disk (docs/architecture.md, "Versioned datasets on disk").

    <data_root>/<stage>/<version>/part-*.parquet  (+ <split>/part-*.parquet, or a checkpoint)
    <data_root>/<stage>/<version>/.manifest.json   written LAST: a folder without it is incomplete
    <data_root>/<stage>/.tmp-<version>/            where a version is built, then renamed
    <data_root>/<stage>/LATEST                     one line: the newest complete version

`data_root` is a local path or an fsspec URL (s3://bucket/prefix, gs://…); a Ray cluster needs
storage that every node sees. Only local paths are tested here; fsspec's rename on object stores
is a copy, which is why completeness is marked by the manifest and not by the rename.

The manifest's name starts with `.` so every Parquet reader skips it and a version or split folder
opens directly: pyarrow/pandas skip `.` and `_` names, but `datasets.load_dataset("parquet",
data_dir=...)` (and its data_files globs) skip only `.` names and `__` folders (datasets'
data_files.py) — a Spark-style `_manifest.json` still broke it. Versions written before carry
`manifest.json` and are still read.
"""
from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

import fsspec
from fsspec.core import url_to_fs

from pipeline.errors import UserError

MANIFEST = ".manifest.json"
LEGACY_MANIFEST = "manifest.json"  # the name before the readers-skip-it rename: still read


@dataclass
class Version:
    stage: str
    version: str
    path: str            # the version folder (local path or URL as given by the data root)
    manifest: dict
    fs: fsspec.AbstractFileSystem

    @property
    def rows(self) -> int | None:
        return self.manifest.get("rows_out")

    @property
    def splits(self) -> list[str]:
        return list(self.manifest.get("splits") or [])

    def parquet_files(self, split: str | None = None) -> list[str]:
        folder = posixpath.join(self.path, split) if split else self.path
        if split is None and self.splits:
            raise UserError(f"{self.stage}@{self.version} has splits {self.splits}: name one")
        return sorted(self.fs.glob(posixpath.join(folder, "part-*.parquet")))

    def read_table(self, split: str | None = None, columns: list[str] | None = None):
        import pyarrow.parquet as pq
        import pyarrow as pa

        files = self.parquet_files(split)
        tables = [pq.read_table(f, filesystem=self.fs, columns=columns) for f in files]
        if not tables:
            return pa.table({})
        return pa.concat_tables(tables, promote_options="default")

    def read_ray(self, split: str | None = None):
        import ray.data

        files = self.parquet_files(split)
        return ray.data.read_parquet(files, filesystem=_arrow_fs(self.fs))

    def ref(self) -> str:
        return f"{self.stage}@{self.version}"


def _arrow_fs(fs):
    import pyarrow.fs as pafs

    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


class Store:
    def __init__(self, data_root: str):
        self.url = data_root
        self.fs, self.root = url_to_fs(data_root)

    def arrow_fs(self):
        return _arrow_fs(self.fs)

    def stage_dir(self, stage: str) -> str:
        return posixpath.join(self.root, stage)

    def version_dir(self, stage: str, version: str) -> str:
        return posixpath.join(self.root, stage, version)

    def tmp_dir(self, stage: str, version: str) -> str:
        return posixpath.join(self.root, stage, f".tmp-{version}")

    def _load(self, stage: str, version: str) -> Version | None:
        path = self.version_dir(stage, version)
        for name in (MANIFEST, LEGACY_MANIFEST):
            try:
                with self.fs.open(posixpath.join(path, name), "r") as f:
                    return Version(stage, version, path, json.load(f), self.fs)
            except FileNotFoundError:
                continue
        return None  # no manifest: incomplete, never read

    def find(self, stage: str, version: str) -> Version | None:
        return self._load(stage, version)

    def get(self, stage: str, version: str) -> Version:
        found = self._load(stage, version)
        if found is None:
            have = ", ".join(v.version for v in self.versions(stage)) or "none"
            raise UserError(f"{stage}@{version}: no complete version under {self.url} "
                            f"(complete versions of {stage}: {have})")
        return found

    def versions(self, stage: str) -> list[Version]:
        """Complete versions, oldest first (by the time their manifest says they finished)."""
        try:
            entries = self.fs.ls(self.stage_dir(stage), detail=False)
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            name = posixpath.basename(entry.rstrip("/"))
            if name.startswith(".") or name == "LATEST":
                continue
            v = self._load(stage, name)
            if v is not None:
                found.append(v)
        return sorted(found, key=lambda v: v.manifest.get("finished_at", ""))

    def latest(self, stage: str) -> Version | None:
        try:
            with self.fs.open(posixpath.join(self.stage_dir(stage), "LATEST"), "r") as f:
                name = f.read().strip()
        except FileNotFoundError:
            return None
        return self._load(stage, name)

    def resolve(self, ref: str) -> Version:
        """'stage' (LATEST) or 'stage@version' -> a complete Version, or a UserError."""
        stage, _, version = ref.partition("@")
        if version:
            return self.get(stage, version)
        found = self.latest(stage)
        if found is None:
            raise UserError(f"{stage}: no complete version under {self.url} "
                            f"(run `distillery run {stage}` first)")
        return found

    def begin(self, stage: str, version: str, clear: bool) -> str:
        tmp = self.tmp_dir(stage, version)
        if clear and self.fs.exists(tmp):
            self.fs.rm(tmp, recursive=True)
        self.fs.makedirs(tmp, exist_ok=True)
        return tmp

    def abort(self, stage: str, version: str) -> None:
        tmp = self.tmp_dir(stage, version)
        if self.fs.exists(tmp):
            self.fs.rm(tmp, recursive=True)

    def commit(self, stage: str, version: str, manifest: dict) -> Version:
        tmp, final = self.tmp_dir(stage, version), self.version_dir(stage, version)
        if self.fs.exists(final):  # a leftover without manifest (crash between rename and write)
            self.fs.rm(final, recursive=True)
        self.fs.mv(tmp, final, recursive=True)
        # The manifest goes in last: only now does the version count as complete.
        self.fs.pipe(posixpath.join(final, MANIFEST),
                     json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())
        self.set_latest(stage, version)
        return self.get(stage, version)

    def set_latest(self, stage: str, version: str) -> None:
        path = posixpath.join(self.stage_dir(stage), "LATEST")
        tmp = path + ".tmp"
        self.fs.pipe(tmp, (version + "\n").encode())
        self.fs.mv(tmp, path)
