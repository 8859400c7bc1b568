"""On-disk feature store: memory-mapped float32 rows, an index of samples, resumable and content-addressed.

Layout of a store folder:
  meta.json            backbone, preprocessing, precision, poolings, dim (dims: a pooling's own D where it differs,
                       e.g. `stages`), classes, fingerprint
  features-<pool>.f32  raw float32 rows [R, D], append-only (one file per pooling, D = dim_of(pool))
  rows.csv             journal: row, sha1 of the image bytes; a line is written only after its rows are on disk
  index.csv            the current dataset: path, label, split, row, sha1 (rewritten atomically at the end)
  skipped.csv          files that could not be decoded, with the reason
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass

import numpy as np

from finegrain.atomic import atomic_write_json, atomic_write_text
from finegrain.errors import FinegrainError

FORMAT_VERSION = 1


@dataclass
class IndexEntry:
    path: str
    label: int
    split: str
    row: int
    sha1: str


class FeatureStore:
    """Writer and reader of a store folder. Open with `FeatureStore.open(dir)` (read) or `create_or_resume`."""

    def __init__(self, root: str, meta: dict) -> None:
        self.root = root
        self.meta = meta
        self.dim = int(meta["dim"])
        self.poolings: list[str] = list(meta["poolings"])
        self.dims = {p: int((meta.get("dims") or {}).get(p, self.dim)) for p in self.poolings}

    def dim_of(self, pooling: str | None = None) -> int:
        """Width D of one pooling's rows (the first pooling's when None): `dim`, or its own for a stage pooling."""
        return self.dims.get(pooling or (self.poolings[0] if self.poolings else ""), self.dim)

    # ---- creation / resume -------------------------------------------------------------------------------------
    @classmethod
    def create_or_resume(cls, root: str, meta: dict, *, overwrite: bool = False) -> FeatureStore:
        """Open `root` for writing. An existing store is resumed if its fingerprint matches `meta["fingerprint"]`."""
        os.makedirs(root, exist_ok=True)
        meta_path = os.path.join(root, "meta.json")
        if os.path.exists(meta_path) and not overwrite:
            old = _read_json(meta_path)
            if old.get("fingerprint") != meta["fingerprint"]:
                raise FinegrainError(
                    f"{root} holds features of another backbone/preprocessing ({old.get('backbone', {}).get('name')}"
                    f", {old.get('fingerprint')}); use another --out, or --overwrite to replace it"
                )
            meta = {**old, **meta}
        elif overwrite:
            for name in os.listdir(root):
                if name.startswith("features-") or name in ("rows.csv", "index.csv", "skipped.csv", "meta.json"):
                    os.unlink(os.path.join(root, name))
        meta["format_version"] = FORMAT_VERSION
        atomic_write_json(meta_path, meta)
        store = cls(root, meta)
        store._repair()
        return store

    def _repair(self) -> None:
        """After a crash: keep the journaled rows, cut any feature bytes written past them."""
        n = len(self.journal())
        for pool in self.poolings:
            path = self._feature_path(pool)
            if not os.path.exists(path):
                open(path, "wb").close()
            size = os.path.getsize(path)
            want = n * self.dim_of(pool) * 4
            if size < want:
                raise FinegrainError(
                    f"{path} is shorter than its journal ({size} < {want} bytes): "
                    "the store is damaged; re-run with --overwrite"
                )
            if size > want:
                with open(path, "r+b") as f:
                    f.truncate(want)

    def journal(self) -> dict[str, int]:
        """sha1 -> row for every row fully written."""
        path = os.path.join(self.root, "rows.csv")
        out: dict[str, int] = {}
        if os.path.exists(path):
            with open(path, newline="") as f:
                for line in f:
                    parts = line.rstrip("\n").split(",")
                    if len(parts) == 2 and parts[0].isdigit() and len(parts[1]) == 40:  # a torn last line is ignored
                        out.setdefault(parts[1], int(parts[0]))
        return out

    def num_rows(self) -> int:
        return os.path.getsize(self._feature_path(self.poolings[0])) // (self.dim_of() * 4)

    def append(self, features: dict[str, np.ndarray], sha1s: list[str]) -> list[int]:
        """Append one batch: features[pool] is [B, D]; returns the new row numbers."""
        start = self.num_rows()
        for pool in self.poolings:
            arr = np.ascontiguousarray(features[pool], dtype=np.float32)
            want = (len(sha1s), self.dim_of(pool))
            if arr.shape != want:
                raise ValueError(f"features[{pool}] has shape {arr.shape}, expected {want}")
            with open(self._feature_path(pool), "ab") as f:
                f.write(arr.tobytes())
                f.flush()
                os.fsync(f.fileno())
        rows = list(range(start, start + len(sha1s)))
        with open(os.path.join(self.root, "rows.csv"), "a") as f:
            f.write("".join(f"{r},{h}\n" for r, h in zip(rows, sha1s)))
            f.flush()
            os.fsync(f.fileno())
        return rows

    def write_index(self, entries: list[IndexEntry], skipped: list[tuple[str, str]]) -> None:
        lines = ["path,label,split,row,sha1"]
        lines += [_csv_line([e.path, e.label, e.split, e.row, e.sha1]) for e in entries]
        atomic_write_text(os.path.join(self.root, "index.csv"), "\n".join(lines) + "\n")
        skipped_lines = ["path,reason"] + [_csv_line([p, r]) for p, r in skipped]
        atomic_write_text(os.path.join(self.root, "skipped.csv"), "\n".join(skipped_lines) + "\n")

    # ---- reading --------------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str) -> FeatureStore:
        meta_path = os.path.join(root, "meta.json")
        if not os.path.exists(meta_path) or not os.path.exists(os.path.join(root, "index.csv")):
            raise FinegrainError(f"{root} is not a finished feature store: run `finegrain extract DATA --out {root}`")
        return cls(root, _read_json(meta_path))

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    def index(self) -> list[IndexEntry]:
        with open(os.path.join(self.root, "index.csv"), newline="") as f:
            return [
                IndexEntry(r["path"], int(r["label"]), r["split"], int(r["row"]), r["sha1"]) for r in csv.DictReader(f)
            ]

    def features(self, pooling: str | None = None) -> np.ndarray:
        """All rows of one pooling as a read-only memory map [R, D] (index rows with `index()[i].row`)."""
        pool = pooling or self.poolings[0]
        if pool not in self.poolings:
            raise FinegrainError(
                f"this store has poolings {self.poolings}, not {pool!r}; re-extract with --pooling {pool}"
            )
        n = self.num_rows()
        if n == 0:
            return np.zeros((0, self.dim_of(pool)), dtype=np.float32)
        return np.memmap(self._feature_path(pool), dtype=np.float32, mode="r", shape=(n, self.dim_of(pool)))

    def split(self, name: str, pooling: str | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(X [N, D] float32 in memory, y [N], paths) for one split ("all" when the data had no splits)."""
        entries = [e for e in self.index() if e.split == name]
        if not entries:
            splits = sorted({e.split for e in self.index()})
            raise FinegrainError(f"split {name!r} is not in {self.root}; splits here: {', '.join(splits)}")
        feats = self.features(pooling)
        rows = np.array([e.row for e in entries], dtype=np.int64)
        return np.asarray(feats[rows]), np.array([e.label for e in entries]), [e.path for e in entries]

    def _feature_path(self, pool: str) -> str:
        return os.path.join(self.root, f"features-{pool}.f32")


def _csv_line(values: list) -> str:
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(values)
    return buf.getvalue()


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise FinegrainError(f"cannot read {path} ({e}); the store is damaged: re-run with --overwrite") from None
