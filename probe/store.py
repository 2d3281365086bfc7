"""The feature store: one Zarr v3 group per (dataset, backbone, input).

Layout (DESIGN.md): `<features>/<dataset>/<backbone>/<input>.zarr/<split>/<array>`. Every data
array of a split shares one row chunking, so a dump pass writes whole chunks and parallel ranks
never share one. Completion is bookkept per chunk in a `progress.<pass>` array with one file per
flag (a flag is set only after every array of its chunk is written), and per array in its
`complete` attribute, set when the pass ends. A store opened with another configuration than the
one requested is refused with the list of differing fields.
"""

import hashlib
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from probe import __version__
from probe.errors import ConfigMismatchError, ProbeError

CHUNK_BYTES = 16 * 2**20  # ~16 MiB per chunk of the widest array: large sequential writes
NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
# Fields that must match for a store to be reused; anything else in the attributes is informative.
IDENTITY_FIELDS = ("dataset", "dataset_fingerprint", "waterbirds_fingerprint", "backbone",
                   "model_id", "weights", "image_size", "mean", "std", "transform", "input",
                   "input_mask_source")
FILLABLE_FIELDS = ("waterbirds_fingerprint",)  # unknown (None) until the split is first dumped


def safe_name(text: str) -> str:
    """A file-system-safe version of `text` (letters, digits, '-', '_' and '.')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "unnamed"


def store_path(features: str | Path, dataset: str, backbone: str, input_name: str) -> Path:
    return Path(features) / safe_name(dataset) / safe_name(backbone) / f"{safe_name(input_name)}.zarr"


def fg_array_name(mask: str, grid: tuple[int, int], rule: str = "area") -> str:
    """`fg.<mask>.<h>x<w>` (area fraction) or `fgseed.<mask>.<h>x<w>` (seed's nearest-exact rule)."""
    prefix = {"area": "fg", "seed": "fgseed"}[rule]
    return f"{prefix}.{mask}.{grid[0]}x{grid[1]}"


def prefix_array_name(tap: str) -> str:
    """The CLS / register tokens that go with a tap: the plain run's (`prefix`) for L and L-1,
    the masked run's (`prefix.<tap>`) for a tap recomputed from a masked L-1 map."""
    return "prefix" if tap in ("L", "L-1") else f"prefix.{tap}"


@dataclass
class ArraySpec:
    tail: tuple[int, ...]  # shape after the row axis
    dtype: str


class Split:
    """One split's arrays; reads are lazy (zarr arrays), ids and labels are small numpy arrays."""

    def __init__(self, group: zarr.Group, name: str):
        self.group, self.name = group, name
        self.rows = int(group.attrs["rows"])
        self.chunk_rows = int(group.attrs["chunk_rows"])

    @property
    def n_chunks(self) -> int:
        return -(-self.rows // self.chunk_rows)

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        return chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.rows)

    def names(self) -> list[str]:
        return sorted(self.group.array_keys())

    def complete(self, name: str) -> bool:
        return name in self.group.array_keys() and bool(self.group[name].attrs.get("complete"))

    def __getitem__(self, name: str) -> zarr.Array:
        if not self.complete(name):
            available = [n for n in self.names() if self.complete(n) and not n.startswith("progress.")]
            raise ProbeError(f"array {name!r} is missing or incomplete in split {self.name!r} of "
                             f"{self.group.store}; available: {', '.join(available) or 'none'}")
        return self.group[name]

    def read(self, name: str) -> np.ndarray:
        return self[name][:]

    def require(self, name: str, spec: ArraySpec) -> zarr.Array:
        if name in self.group.array_keys():
            array = self.group[name]
            if tuple(array.shape) != (self.rows, *spec.tail) or str(array.dtype) != spec.dtype:
                raise ConfigMismatchError(
                    f"array {name} in {self.group.store} has shape {array.shape} {array.dtype}, "
                    f"expected {(self.rows, *spec.tail)} {spec.dtype}; dump with --overwrite")
            return array
        return self.group.create_array(name, shape=(self.rows, *spec.tail), dtype=spec.dtype,
                                       chunks=(self.chunk_rows, *spec.tail), fill_value=0)

    def progress(self, pass_names: list[str]) -> zarr.Array:
        """Per-chunk done flags of the pass writing `pass_names` (one file per flag)."""
        key = "progress." + hashlib.sha256(",".join(sorted(pass_names)).encode()).hexdigest()[:12]
        if key not in self.group.array_keys():
            array = self.group.create_array(key, shape=(self.n_chunks,), chunks=(1,),
                                            dtype="uint8", fill_value=0)
            array.attrs["arrays"] = sorted(pass_names)
        return self.group[key]

    def finish(self, pass_names: list[str]) -> None:
        for name in pass_names:
            self.group[name].attrs["complete"] = True


class FeatureStore:
    def __init__(self, path: Path, group: zarr.Group):
        self.path, self.group = path, group

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "FeatureStore":
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise ProbeError(f"no feature store at {path}; create it with `probe dump`")
        return cls(path, zarr.open_group(path, mode=mode))

    @classmethod
    def create(cls, path: str | Path, attrs: dict, overwrite: bool = False) -> "FeatureStore":
        """Open the store for writing, creating it if needed; refuse a different configuration."""
        path = Path(path)
        if (path / "zarr.json").is_file() and not overwrite:
            store = cls.open(path, mode="a")
            store.check_identity(attrs)
            for key in FILLABLE_FIELDS:  # learnt later, e.g. the Waterbirds folder added later
                if store.attrs.get(key) is None and attrs.get(key) is not None:
                    store.group.attrs[key] = attrs[key]
            return store
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(cls.caches_of(path), ignore_errors=True)  # derived from a build now gone
        group = zarr.open_group(path, mode="w")
        group.attrs.update({**attrs, "probe_version": __version__, "store_format": 1,
                            "store_id": uuid.uuid4().hex[:16]})  # keys caches to this build
        return cls(path, group)

    @staticmethod
    def caches_of(path: Path) -> Path:
        """The folder beside a store holding arrays derived from it (pooled features)."""
        return path.with_suffix(".pooled")

    @property
    def cache_dir(self) -> Path:
        """Caches of this build of the store: a store rebuilt in place gets a new store_id, and
        creating it removes the caches of the old one."""
        return self.caches_of(self.path) / self.attrs["store_id"]

    def check_identity(self, attrs: dict) -> None:
        mine = self.attrs
        diffs = [f"{k}: store has {mine.get(k)!r}, requested {attrs.get(k)!r}"
                 for k in identity_differences(mine, attrs)]
        if diffs:
            raise ConfigMismatchError(
                f"the feature store {self.path} was built with another configuration:\n  "
                + "\n  ".join(diffs)
                + "\nuse another --out folder, or pass --overwrite to replace the store")

    def splits(self) -> list[str]:
        return sorted(self.group.group_keys())

    def has_split(self, name: str) -> bool:
        return name in self.group.group_keys()

    def split(self, name: str) -> Split:
        if not self.has_split(name):
            raise ProbeError(f"split {name!r} is not in {self.path}; it has "
                             f"{', '.join(self.splits()) or 'no splits'}")
        return Split(self.group[name], name)

    def create_split(self, name: str, rows: int, row_bytes: int, index: dict[str, np.ndarray],
                     chunk_rows: int | None = None, batch_rows: int = 1,
                     replace: bool = False) -> Split:
        """Create (or reopen) a split with its index arrays (ids, labels, ...) written at once.

        Chunks hold a whole number of `batch_rows` (the dump's batches never cross a chunk) and
        about CHUNK_BYTES of the widest array. A split whose index was never finished (an
        interrupted creation) is rebuilt; one holding other images is refused unless `replace`.
        """
        if self.has_split(name):
            split = Split(self.group[name], name)
            ready = all(split.complete(k) for k in index)
            if ready and split.rows == rows and np.array_equal(split.read("ids"), index["ids"]):
                return split
            if ready and not replace:
                raise ConfigMismatchError(
                    f"split {name!r} of {self.path} holds {split.rows} rows of other images than "
                    f"requested ({rows}); pass --overwrite to rebuild the store")
            del self.group[name]
        shutil.rmtree(self.cache_dir / name, ignore_errors=True)  # derived from rows now gone
        if not chunk_rows:
            by_size = max(CHUNK_BYTES // max(row_bytes, 1), 1)
            chunk_rows = int(min(-(-by_size // batch_rows) * batch_rows, 4096 * batch_rows))
        group = self.group.create_group(name)
        group.attrs.update({"rows": rows, "chunk_rows": min(chunk_rows, max(rows, 1))})
        split = Split(group, name)
        for key, values in index.items():
            split.require(key, ArraySpec(values.shape[1:], str(values.dtype)))[:] = values
        split.finish(list(index))
        return split

    def check_mask_source(self, name: str, spec: str) -> None:
        """One short name, one folder: two folders named alike must not share fg arrays."""
        known = self.attrs.get("mask_sources") or {}
        if known.get(name, spec) != spec:
            raise ConfigMismatchError(
                f"in {self.path} the mask source name {name!r} already stands for {known[name]}; "
                f"{spec} has the same name: rename one of the folders")

    def register_mask_source(self, name: str, spec: str) -> None:
        self.check_mask_source(name, spec)
        self.group.attrs["mask_sources"] = {**(self.attrs.get("mask_sources") or {}), name: spec}


def identity_differences(mine: dict, theirs: dict, fields=IDENTITY_FIELDS) -> list[str]:
    """The identity fields on which two store configurations disagree (a fillable field still
    unknown on either side agrees)."""
    return [k for k in fields if k in theirs and _canon(mine.get(k)) != _canon(theirs[k])
            and not (k in FILLABLE_FIELDS and None in (mine.get(k), theirs[k]))]


def _canon(value):
    """Compare JSON-round-tripped values (tuples come back from Zarr attributes as lists)."""
    if isinstance(value, (tuple, list)):
        return [_canon(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
