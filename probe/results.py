"""Run records: one JSON file per fitted or fine-tuned model in ``<results>/runs/<id>.json``.

The id is a hash of the full configuration, so an identical fit is found again
(and reused) instead of being recomputed, and two processes that finish the
same fit write the same file. Records are written atomically (temp file in the
same folder, fsync, rename) so a reader never sees half a record, and
``load_records`` skips anything it cannot parse rather than failing a report.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import warnings
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from probe import __version__
from probe.errors import ProbeError
from probe.files import atomic

SCHEMA = 1

#: Columns of ``load_records``: one row per (record, eval set).
#: ``data`` is the training dataset (config "dataset"); ``dataset`` is the eval set's
#: role: "cub" (in-distribution test split) or "waterbirds" (background-swapped copy).
COLUMNS = [
    "record_id", "kind", "data", "backbone", "regime", "strategy", "stage",
    "representation", "pooling", "mask_source", "fg_rule", "train_input", "test_input",
    "dataset", "top1", "mean_per_class", "n", "worst_group", "classifier", "recipe",
    "views", "seed", "setting", "created", "path",
]
_CONFIG_COLUMNS = [
    "backbone", "regime", "strategy", "stage", "representation", "pooling", "mask_source",
    "fg_rule", "train_input", "classifier", "recipe", "views", "seed",
]
_METRIC_COLUMNS = ["top1", "mean_per_class", "n", "worst_group"]


def jsonable(value: Any) -> Any:
    """json ``default`` hook: numpy scalars/arrays and paths become plain JSON values."""
    if hasattr(value, "tolist"):  # numpy scalar or array
        return value.tolist()
    if isinstance(value, (Path, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"run records hold JSON values only, got {type(value).__name__}: {value!r}")


def _canonical(config: dict) -> str:
    # Sorted keys and fixed separators: the same configuration always hashes the same,
    # whatever order its keys were built in (tuples and lists also hash the same).
    return json.dumps(config, sort_keys=True, separators=(",", ":"), default=jsonable)


def record_id(config: dict) -> str:
    """16 hex characters of the SHA-256 of the configuration's canonical JSON."""
    return hashlib.sha256(_canonical(config).encode()).hexdigest()[:16]


def _runs_dir(results_dir: str | os.PathLike) -> Path:
    return Path(results_dir) / "runs"


def _versions() -> dict:
    # importlib.metadata instead of importing torch/timm: reading a version costs
    # milliseconds, importing torch costs seconds.
    versions = {"probe": __version__, "python": platform.python_version()}
    for package in ("torch", "timm", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def write_record(record: dict, results_dir: str | os.PathLike = "results") -> Path:
    """Write ``record`` to ``results_dir/runs/<id>.json`` atomically and return the path.

    Fills "schema", "id", "created" and "versions" when absent (in ``record`` itself,
    so the caller holds the record exactly as written).
    """
    config = record.get("config")
    if not isinstance(config, dict):
        raise ProbeError("a run record needs a 'config' dict; got "
                         f"{type(config).__name__} (keys: {sorted(record)})")
    record.setdefault("schema", SCHEMA)
    record.setdefault("id", record_id(config))
    record.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    record.setdefault("versions", _versions())
    text = json.dumps(record, indent=1, sort_keys=True, default=jsonable)

    folder = _runs_dir(results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{record['id']}.json"
    # the temporary name does not end in .json, so readers never pick it up
    with atomic(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return path


def read_record(path: str | os.PathLike) -> dict:
    """Parse one record file; raise ValueError if it is not a complete record."""
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict) \
            or not isinstance(record.get("metrics"), dict):
        raise ValueError("not a run record (needs 'config' and 'metrics' objects)")
    return record


def find_record(config: dict, results_dir: str | os.PathLike = "results") -> dict | None:
    """The stored record of exactly this configuration, or None (missing or unreadable)."""
    path = _runs_dir(results_dir) / f"{record_id(config)}.json"
    try:
        record = read_record(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        warnings.warn(f"ignoring unreadable run record {path} ({err}); it will be recomputed",
                      RuntimeWarning, stacklevel=2)
        return None
    # Guards against a (vanishingly unlikely) hash-prefix collision.
    return record if _canonical(record["config"]) == _canonical(config) else None


def _eval_role(name: str, data: str | None) -> str:
    """Map an eval-set name to its role: the training data's own test split is "cub"."""
    return "cub" if name in ("cub", "test", data) and name != "waterbirds" else name


def _rows(record: dict, path: Path) -> list[dict]:
    config = record["config"]
    kind = record.get("kind", "fit")
    base = {key: config.get(key) for key in _CONFIG_COLUMNS}
    base.update(record_id=record.get("id", path.stem), kind=kind, data=config.get("dataset"),
                created=record.get("created"), path=str(path),
                setting=record_id({k: v for k, v in config.items() if k != "seed"}))
    if base["regime"] is None:  # older or hand-made records: the kind implies the regime
        base["regime"] = "finetuned" if kind == "finetune" else "frozen"
    rows = []
    for key, metrics in record["metrics"].items():
        if not isinstance(metrics, dict):
            continue
        eval_name, _, test_input = key.rpartition("/")
        if not eval_name:  # a bare "<dataset>" key means the original images
            eval_name, test_input = key, "original"
        row = dict(base, dataset=_eval_role(eval_name, base["data"]), test_input=test_input)
        row.update({m: metrics.get(m) for m in _METRIC_COLUMNS})
        rows.append(row)
    return rows


def load_records(results_dir: str | os.PathLike = "results") -> pd.DataFrame:
    """All records as a long frame (columns ``COLUMNS``), one row per (record, eval set).

    Unreadable or partial files are skipped with a warning naming the file; temp
    files of writes in progress are never read.
    """
    rows: list[dict] = []
    for path in sorted(_runs_dir(results_dir).glob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            rows.extend(_rows(read_record(path), path))
        except (OSError, ValueError, AttributeError, TypeError) as err:
            warnings.warn(f"skipping unreadable run record {path}: {err}",
                          RuntimeWarning, stacklevel=2)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    for column in _METRIC_COLUMNS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame
