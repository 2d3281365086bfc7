"""CUB-200-2011 and its Waterbirds copy, read from the official files.

Splits: `train` and `test` (train_test_split.txt), `val` (a class-stratified 10% of train, for
choosing hyper-parameters), `train.rest` (train without val) and `waterbirds` (the CUB test ids
with pixels from the Waterbirds folder and the CUB species labels).
"""

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from probe.data.images import load_rgb
from probe.data.masks import MaskSource
from probe.data.splits import stratified_holdout
from probe.errors import DataError

WATERBIRDS_DIRNAME = "waterbird_complete95_forest2water2"
INDEX_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
SPLITS = ("train", "test", "val", "train.rest", "waterbirds")


class Problems(list):
    """Collects problems when checking a dataset; raises on the first one when reading it."""

    def __init__(self, collect: bool):
        super().__init__()
        self.collect = collect

    def add(self, message: str) -> None:
        if not self.collect:
            raise DataError(message)
        self.append(message)


def _read_pairs(path: Path, problems: Problems) -> dict[int, str]:
    """`<int id> <value>` lines of an index file, keyed by id."""
    if not path.is_file():
        problems.add(f"missing index file {path}; is this a CUB-200-2011 root folder?")
        return {}
    pairs: dict[int, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        key, _, value = line.strip().partition(" ")
        if not key.isdigit() or not value.strip():
            problems.add(f"{path}:{lineno}: expected '<id> <value>', got {line!r}")
            continue
        if int(key) in pairs:
            problems.add(f"{path}:{lineno}: duplicate id {key}")
            continue
        pairs[int(key)] = value.strip()
    return pairs


@dataclass
class CUBIndex:
    """The parsed index files; row order follows ascending image id."""

    root: Path
    ids: np.ndarray
    paths: list[str]
    labels: np.ndarray  # 0-based
    is_train: np.ndarray
    class_names: list[str]
    problems: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, root: str | Path, collect_problems: bool = False) -> "CUBIndex":
        root = Path(root).expanduser()
        problems = Problems(collect_problems)
        if not root.is_dir():
            problems.add(f"dataset root {root} does not exist; pass the CUB_200_2011 folder")
        images, labels, splits, classes = (_read_pairs(root / n, problems) for n in INDEX_FILES)
        if sorted(classes) != list(range(1, len(classes) + 1)):
            problems.add(f"{root / 'classes.txt'}: class ids must be exactly 1..{len(classes)}")
        ids, paths, label_list, train_list = [], [], [], []
        for image_id in sorted(images):
            rel = images[image_id]
            where = f"{root / 'images.txt'}: image {image_id} ({rel})"
            pure = PurePosixPath(rel)
            if pure.is_absolute() or ".." in pure.parts:
                problems.add(f"{where}: path escapes the dataset's images/ folder")
                continue
            label, split = labels.get(image_id), splits.get(image_id)
            if label is None or split is None:
                missing = "image_class_labels.txt" if label is None else "train_test_split.txt"
                problems.add(f"{where}: no entry in {missing}")
                continue
            if not label.isdigit() or not 1 <= int(label) <= len(classes):
                problems.add(f"{root / 'image_class_labels.txt'}: image {image_id} has label "
                             f"{label!r}, outside 1..{len(classes)} of classes.txt")
                continue
            if split not in ("0", "1"):
                problems.add(f"{root / 'train_test_split.txt'}: image {image_id} has split "
                             f"{split!r}; expected 1 (train) or 0 (test)")
                continue
            ids.append(image_id)
            paths.append(rel)
            label_list.append(int(label) - 1)
            train_list.append(split == "1")
        for extra in sorted(set(labels) - set(images))[:5]:
            problems.add(f"{root / 'image_class_labels.txt'}: id {extra} is not in images.txt")
        return cls(root, np.asarray(ids, dtype=np.int64), paths,
                   np.asarray(label_list, dtype=np.int64), np.asarray(train_list, dtype=bool),
                   [classes[c] for c in sorted(classes)], list(problems))

    def rows(self, split: str, val_fraction: float = 0.1, seed: int = 0) -> np.ndarray:
        """Row indices of a split, in ascending image id."""
        if split in ("test", "waterbirds"):
            return np.flatnonzero(~self.is_train)
        train = np.flatnonzero(self.is_train)
        if split == "train":
            return train
        if split in ("val", "train.rest"):
            held = stratified_holdout(self.ids[train], self.labels[train], val_fraction, seed)
            return train[held] if split == "val" else train[~held]
        raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")

    def fingerprint(self) -> str:
        """Hash of the index files: identifies the dataset a store or record was made from."""
        digest = hashlib.sha256()
        for name in INDEX_FILES:
            digest.update((self.root / name).read_bytes())
        return digest.hexdigest()[:16]


def waterbirds_fingerprint(folder: Path) -> str | None:
    """Hash of the Waterbirds metadata.csv (None without the folder): which backgrounds it has."""
    path = Path(folder) / "metadata.csv"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


def read_waterbirds_metadata(folder: Path) -> dict[str, tuple[int, int]]:
    """img_filename -> (waterbird label y, place) from the Waterbirds metadata.csv."""
    path = folder / "metadata.csv"
    if not path.is_file():
        raise DataError(f"missing {path}; pass --waterbirds with the Waterbirds folder "
                        f"({WATERBIRDS_DIRNAME} from the Waterbirds release)")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        needed = {"img_filename", "y", "place"}
        if not needed <= set(reader.fieldnames or ()):
            raise DataError(f"{path}: expected columns img_id,img_filename,y,split,place,"
                            f"place_filename; found {reader.fieldnames}")
        table = {}
        for lineno, row in enumerate(reader, 2):
            try:
                table[row["img_filename"]] = (int(row["y"]), int(row["place"]))
            except (TypeError, ValueError):
                raise DataError(f"{path}:{lineno}: y and place must be 0 or 1") from None
    return table


@dataclass
class Sample:
    image: Image.Image
    label: int
    image_id: int
    path: str
    mask: np.ndarray | None = None
    waterbird: int | None = None
    place: int | None = None


class CUB:
    """One split of CUB-200-2011 (or its Waterbirds copy) as a map-style dataset of Samples."""

    def __init__(self, root: str | Path, split: str = "train", masks: "str | MaskSource | None" = None,
                 waterbirds_root: str | Path | None = None, val_fraction: float = 0.1, seed: int = 0):
        self.index = CUBIndex.load(root)
        self.root = self.index.root
        self.split = split
        self.masks = MaskSource.parse(masks)
        rows = self.index.rows(split, val_fraction, seed)
        self.ids = self.index.ids[rows]
        self.labels = self.index.labels[rows]
        self.paths = [self.index.paths[r] for r in rows]
        self.class_names = self.index.class_names
        self.waterbird = self.place = None
        if split == "waterbirds":
            self.image_root = Path(waterbirds_root or self.root / WATERBIRDS_DIRNAME).expanduser()
            meta = read_waterbirds_metadata(self.image_root)
            missing = [p for p in self.paths if p not in meta]
            if missing:
                raise DataError(f"{len(missing)} CUB test images have no row in "
                                f"{self.image_root / 'metadata.csv'}, e.g. {missing[:3]}")
            self.waterbird = np.asarray([meta[p][0] for p in self.paths], dtype=np.int64)
            self.place = np.asarray([meta[p][1] for p in self.paths], dtype=np.int64)
        else:
            self.image_root = self.root / "images"

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, i: int) -> Path:
        return self.image_root / self.paths[i]

    def __getitem__(self, i: int) -> Sample:
        image = load_rgb(self.image_path(i))
        mask = None
        if self.masks.kind != "none":
            mask = self.masks.load(self.root, self.paths[i], image.size, self.split == "waterbirds")
        extra = {}
        if self.waterbird is not None:
            extra = dict(waterbird=int(self.waterbird[i]), place=int(self.place[i]))
        return Sample(image, int(self.labels[i]), int(self.ids[i]), self.paths[i], mask, **extra)

    def missing_masks(self) -> list[Path]:
        return self.masks.missing(self.root, self.paths, self.split == "waterbirds")
