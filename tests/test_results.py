"""Run records: stable ids, atomic writes, concurrent writers, tolerant loading."""

import hashlib
import json
import multiprocessing
import os

import pytest

from probe.errors import ProbeError
from probe.results import find_record, load_records, record_id, write_record

EXPECTED_COLUMNS = [
    "record_id", "kind", "data", "backbone", "regime", "strategy", "stage", "representation",
    "pooling", "mask_source", "fg_rule", "train_input", "test_input", "dataset", "top1",
    "mean_per_class", "n", "worst_group", "classifier", "recipe", "views", "seed", "setting",
    "created", "path",
]


def config(**overrides):
    base = dict(dataset="cub", backbone="vit_b", regime="frozen", strategy="late", stage="L",
                representation="cls+patch", pooling="mean", mask_source="gt", fg_rule="seed",
                train_input="original", classifier="linear", recipe="paper", views=0, seed=0)
    return base | overrides


def record(**overrides):
    metrics = {"cub/original": {"top1": 88.5, "mean_per_class": 88.1, "n": 5794},
               "cub/masked": {"top1": 87.0, "mean_per_class": 86.9, "n": 5794},
               "waterbirds/original": {"top1": 77.0, "mean_per_class": 76.0, "n": 5794,
                                       "worst_group": 51.5},
               "waterbirds/masked": {"top1": 83.0, "mean_per_class": 82.0, "n": 5794}}
    return {"kind": "fit", "config": config(**overrides), "metrics": metrics}


def test_record_id_is_a_stable_hash_independent_of_key_order():
    a = {"backbone": "vit_b", "seed": 0, "taps": [1, 2], "nested": {"x": 1, "y": None}}
    b = {"nested": {"y": None, "x": 1}, "taps": (1, 2), "seed": 0, "backbone": "vit_b"}
    canonical = '{"backbone":"vit_b","nested":{"x":1,"y":null},"seed":0,"taps":[1,2]}'
    assert record_id(a) == record_id(b) == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert record_id(a | {"seed": 1}) != record_id(a)


def test_write_record_fills_metadata_and_leaves_no_temp_file(tmp_path):
    rec = record()
    path = write_record(rec, tmp_path)
    assert path == tmp_path / "runs" / f"{record_id(rec['config'])}.json"
    assert os.listdir(tmp_path / "runs") == [path.name]  # the temp file was renamed away
    stored = json.loads(path.read_text())
    assert stored == rec and stored["schema"] == 1 and stored["id"] == path.stem
    assert set(stored["versions"]) == {"probe", "torch", "timm", "numpy", "python"}
    assert stored["created"][:2] == "20"


def test_failed_write_leaves_neither_record_nor_temp_file(tmp_path, monkeypatch):
    write_record(record(seed=1), tmp_path)

    def broken_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_record(record(seed=2), tmp_path)
    assert len(os.listdir(tmp_path / "runs")) == 1
    with pytest.raises(ProbeError, match="config"):
        write_record({"metrics": {}}, tmp_path)


def test_find_record_reuses_identical_configuration_only(tmp_path):
    write_record(record(), tmp_path)
    reordered = dict(reversed(list(config().items())))
    assert find_record(reordered, tmp_path)["metrics"]["cub/original"]["top1"] == 88.5
    assert find_record(config(seed=7), tmp_path) is None
    assert find_record(config(), tmp_path / "elsewhere") is None


def test_load_records_one_row_per_eval_set(tmp_path):
    write_record(record(), tmp_path)
    write_record(record(strategy="baseline", stage=None, fg_rule=None, seed=3), tmp_path)
    frame = load_records(tmp_path)
    assert list(frame.columns) == EXPECTED_COLUMNS
    assert len(frame) == 8
    row = frame[(frame.strategy == "late") & (frame.dataset == "waterbirds")
                & (frame.test_input == "original")].iloc[0]
    assert (row.top1, row.mean_per_class, row.n, row.worst_group) == (77.0, 76.0, 5794, 51.5)
    assert (row.data, row.backbone, row.stage, row.kind) == ("cub", "vit_b", "L", "fit")
    assert row.record_id == record_id(config()) and row.path.endswith(f"{row.record_id}.json")
    assert set(frame[frame.seed == 3].test_input) == {"original", "masked"}
    # A dataset's own test split is reported in the in-distribution ("cub") role.
    synth = record(dataset="synth")
    synth["metrics"] = {"synth/original": {"top1": 50.0}, "waterbirds/original": {"top1": 20.0}}
    write_record(synth, tmp_path)
    rows = load_records(tmp_path).query("data == 'synth'")
    assert dict(zip(rows.dataset, rows.top1)) == {"cub": 50.0, "waterbirds": 20.0}


def test_load_records_of_empty_or_missing_folder(tmp_path):
    (tmp_path / "runs").mkdir()
    for folder in (tmp_path, tmp_path / "missing"):
        frame = load_records(folder)
        assert frame.empty and list(frame.columns) == EXPECTED_COLUMNS


def test_corrupt_partial_and_temp_files_are_skipped(tmp_path):
    good = write_record(record(), tmp_path)
    runs = tmp_path / "runs"
    (runs / "truncated.json").write_text(good.read_text()[:40])
    (runs / "not-a-record.json").write_text("[1, 2, 3]")
    (runs / ".0123456789abcdef.x1y2.tmp").write_text("{")  # a write in progress
    with pytest.warns(RuntimeWarning) as caught:
        frame = load_records(tmp_path)
    messages = " ".join(str(w.message) for w in caught)
    assert "truncated.json" in messages and "not-a-record.json" in messages
    assert ".tmp" not in messages
    assert set(frame.record_id) == {good.stem}
    (runs / f"{record_id(config(seed=9))}.json").write_text("{")
    with pytest.warns(RuntimeWarning, match="recomputed"):
        assert find_record(config(seed=9), tmp_path) is None


def _write_many(args):
    results_dir, worker = args
    for i in range(20):
        write_record(record(seed=worker * 100 + i), results_dir)


def test_concurrent_writers_lose_nothing(tmp_path):
    with multiprocessing.get_context("fork").Pool(8) as pool:
        pool.map(_write_many, [(str(tmp_path), w) for w in range(8)])
    names = os.listdir(tmp_path / "runs")
    assert len(names) == 160 and all(n.endswith(".json") for n in names)
    frame = load_records(tmp_path)
    assert frame.record_id.nunique() == 160
    assert sorted(frame.seed.unique()) == sorted(w * 100 + i for w in range(8) for i in range(20))
