"""Resumable shards: the one loop that generate, provenance and every later long stage use to
carry finished work across runs (docs/architecture.md, "Resuming").

A stage cuts its input into fixed shards (sorted rows, every `shard_size`), so the same input
always gives the same shards. Each finished shard is written atomically as part-NNNNN.parquet
into a folder of the version's temporary folder (a hidden temp file, then a rename: a kill
leaves no partial part file); a rerun of the same version skips the shards already there.

    shards = Shards(fs, ctx.out_dir)
    todo = shards.todo(len(pieces))                       # the missing ones, in order
    ds = ray.data.from_arrow(tagged({k: pieces[k] for k in todo}))
    for k, table in shards.gather(work(ds), {k: rows_expected(k) for k in todo}, "generate"):
        shards.write(k, finish(table))                    # as soon as the shard is complete
"""
from __future__ import annotations

import posixpath

SHARD_COLUMN = "_shard"  # which shard a row came from, while it is in flight


def part_name(k: int) -> str:
    return f"part-{k:05d}.parquet"


class Shards:
    """The part files of one folder (local or fsspec) and their atomic writes."""

    def __init__(self, fs, folder: str):
        self.fs, self.folder = fs, folder
        fs.makedirs(folder, exist_ok=True)

    def path(self, k: int) -> str:
        return posixpath.join(self.folder, part_name(k))

    def done(self, k: int) -> bool:
        return self.fs.exists(self.path(k))

    def todo(self, count: int) -> list[int]:
        """Shards 0..count-1 not written yet, in order."""
        return [k for k in range(count) if not self.done(k)]

    def write(self, k: int, table) -> None:
        """Atomic: a hidden temp file beside the part, then a rename."""
        import pyarrow.parquet as pq

        tmp = posixpath.join(self.folder, f".{part_name(k)}.tmp")
        with self.fs.open(tmp, "wb") as f:
            pq.write_table(table, f)
        self.fs.mv(tmp, self.path(k))

    def gather(self, ds, expected: dict[int, int], stage: str):
        """(k, table) for each shard of `ds` (rows tagged by `tagged`) once all its `expected[k]`
        rows have arrived, tag dropped, in the order shards complete. prefetch_batches=0: with
        prefetching a finished shard reaches the caller only when the next one is done too
        (measured: one shard late), and a kill then loses both."""
        import pyarrow as pa
        import pyarrow.compute as pc

        pending: dict[int, list] = {}
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow",
                                     prefetch_batches=0):
            for k in set(batch.column(SHARD_COLUMN).to_pylist()):
                pending.setdefault(k, []).append(
                    batch.filter(pc.equal(batch.column(SHARD_COLUMN), k)))
                if sum(t.num_rows for t in pending[k]) < expected[k]:
                    continue
                yield k, pa.concat_tables(pending.pop(k)).drop([SHARD_COLUMN])
        if pending:
            raise RuntimeError(f"{stage}: shards {sorted(pending)} came back incomplete")


def tagged(pieces: dict) -> list:
    """One Arrow block per shard, each row tagged with its shard. With one block per shard and
    batch_size = shard_size, every engine or actor call is exactly one shard (the last, the only
    short one, comes last) and each Ray task returns as soon as its shard is done."""
    import pyarrow as pa

    return [t.append_column(SHARD_COLUMN, pa.array([k] * t.num_rows, pa.int32()))
            for k, t in pieces.items()]
