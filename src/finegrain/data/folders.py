"""Find labelled images: ImageFolder layouts (`root/class/img`, `root/{train,val,test}/class/img`) and CSV manifests."""

from __future__ import annotations

import csv
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field

from finegrain.data.decode import IMAGE_EXTENSIONS
from finegrain.errors import FinegrainError

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    path: str  # absolute
    label: int  # index into ImageSet.classes
    split: str  # "train", "val", "test", or "all" for a flat folder


@dataclass
class ImageSet:
    """Every labelled image found under a root, with class names shared by all splits."""

    root: str
    classes: list[str]
    samples: list[Sample]
    warnings: list[str] = field(default_factory=list)

    @property
    def splits(self) -> list[str]:
        # train, val, test first, then any other name alphabetically (a set's order changes with the hash seed)
        return sorted({s.split for s in self.samples}, key=lambda s: ((SPLIT_NAMES + (s,)).index(s), s))

    def split(self, name: str) -> list[Sample]:
        out = [s for s in self.samples if s.split == name]
        if not out:
            raise FinegrainError(f"split {name!r} is empty or missing in {self.root}; splits here: {self.splits}")
        return out

    def counts(self, split: str | None = None) -> list[int]:
        c = Counter(s.label for s in self.samples if split is None or s.split == split)
        return [c.get(i, 0) for i in range(len(self.classes))]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _scan_class_dirs(root: str, split: str, class_index: dict[str, int], notes: list[str]) -> list[Sample]:
    samples = []
    for cls in sorted(class_index):
        folder = os.path.join(root, cls)
        if not os.path.isdir(folder):
            continue
        files = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # .ipynb_checkpoints holds copies
            files += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f)]
        if not files:
            notes.append(f"class folder {folder} has no images")
        samples += [Sample(os.path.abspath(p), class_index[cls], split) for p in files]
    return samples


def _subdirs(path: str) -> list[str]:
    return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))


def scan_folder(root: str) -> ImageSet:
    """ImageFolder layout; with `train/`, `val/`, `test/` subfolders each is a split, else one split "all"."""
    if not os.path.isdir(root):
        raise FinegrainError(f"{root} is not a folder: give a folder of class subfolders or a CSV manifest")
    top = _subdirs(root)
    split_dirs = [d for d in top if d in SPLIT_NAMES]
    layout = [(os.path.join(root, d), d) for d in split_dirs] if split_dirs else [(root, "all")]
    classes = sorted({c for folder, _ in layout for c in _subdirs(folder)})
    if not classes:
        raise FinegrainError(
            f"no class folders in {root}: expected {root}/<class>/<image> or {root}/train/<class>/<image>"
        )
    index = {c: i for i, c in enumerate(classes)}
    notes: list[str] = []
    samples = [s for folder, split in layout for s in _scan_class_dirs(folder, split, index, notes)]
    return _finish(ImageSet(os.path.abspath(root), classes, samples, notes))


def read_manifest(path: str) -> ImageSet:
    """CSV with a header and columns `path,label` (optionally `split`); relative paths are from the CSV's folder."""
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = {c.strip().lower(): c for c in reader.fieldnames or []}
        if "path" not in cols or "label" not in cols:
            raise FinegrainError(
                f"{path}: a manifest needs a header with columns path,label[,split]; found {reader.fieldnames}"
            )
        rows = []
        for r in reader:  # a short row has None in its missing columns
            file, label = (r[cols["path"]] or "").strip(), (r[cols["label"]] or "").strip()
            if file and not label:
                raise FinegrainError(f"{path}: line {reader.line_num}: {file} has no label")
            rows.append((file, label, (r.get(cols.get("split", ""), "") or "").strip() or "all"))
    rows = [r for r in rows if r[0]]
    classes = sorted({label for _, label, _ in rows})
    index = {c: i for i, c in enumerate(classes)}
    samples = [Sample(os.path.normpath(os.path.join(base, p)), index[label], split) for p, label, split in rows]
    return _finish(ImageSet(base, classes, samples, []))


def load_image_set(path: str) -> ImageSet:
    """A folder (ImageFolder layout) or a `.csv` manifest."""
    if os.path.isfile(path) and path.lower().endswith(".csv"):
        return read_manifest(path)
    if not os.path.exists(path):
        raise FinegrainError(f"{path} does not exist: give a folder of images or a CSV manifest")
    return scan_folder(path)


def _finish(image_set: ImageSet) -> ImageSet:
    if not image_set.samples:
        raise FinegrainError(f"no images found under {image_set.root} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    for note in image_set.warnings:
        warnings.warn(note, stacklevel=3)
    return image_set
