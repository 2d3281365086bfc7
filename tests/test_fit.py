import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import probe.fit as fit_module
from probe.cli import main
from probe.data.splits import stratified_holdout
from probe.errors import ProbeError
from probe.fit import fit
from probe.heads import LinearHead
from probe.metrics import accuracy
from probe.pooling import PoolSpec
from probe.run import demo, run
from probe.store import ArraySpec, FeatureStore


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    """The demo pipeline on a small synthetic set: stores, records and report for two backbones."""
    out = tmp_path_factory.mktemp("demo")
    return out, demo(out, classes=6, per_class=10, size=64, progress=False)


def _store(out, backbone, input_name="original"):
    return FeatureStore.open(out / "features" / "birds" / backbone / f"{input_name}.zarr")


def test_demo_writes_every_table_and_early_masking_holds_out_of_distribution(small_demo):
    out, result = small_demo
    reports = out / "reports"
    for table in (3, 4, 5, 6):
        for ext in ("csv", "md", "png"):
            assert (reports / f"table{table}-birds.{ext}").is_file(), (table, ext)
    assert (reports / "report.md").is_file() and "Table 4" in result["report"].headline
    records = [json.loads(p.read_text()) for p in (out / "results" / "runs").glob("*.json")]
    for backbone in ("test_vit", "test_convnext"):
        by_strategy = {r["config"]["strategy"]: r["metrics"] for r in records
                       if r["config"]["backbone"] == backbone and r["config"]["stage"] is None
                       and r["config"]["representation"] in ("cls+patch", "patch")}
        baseline = by_strategy["baseline"]["waterbirds/original"]["top1"]
        early = by_strategy["early"]["waterbirds/masked"]["top1"]
        assert early > baseline + 20, (backbone, baseline, early)
    t4 = pd.read_csv(reports / "table4-birds.csv")
    assert set(t4.iloc[:, 0]) >= {"test_vit", "test_convnext"}


def test_second_run_reuses_everything(small_demo):
    out, _ = small_demo
    counts = run((3, 4, 5, 6), ("test_vit", "test_convnext"), data_root=out / "birds",
                 features=out / "features", results=out / "results", frozen_only=True,
                 random_init=True, image_size=64, workers=0, device="cpu", progress=False)
    assert counts["new_fits"] == 0 and counts["fits"] > 0


def test_fit_equals_an_independent_pooling_and_head(small_demo):
    out, _ = small_demo
    record = fit("test_vit", features=out / "features", mask="late", head="cls+patch",
                 results=out / "results", force=True)
    store = _store(out, "test_vit")
    train, wb = store.split("train"), store.split("waterbirds")

    def features(split):  # late masking by hand: zero background cells, divide by all cells
        grid = split.read("L").astype(np.float32)
        keep = split.read("fgseed.gt.4x4").astype(np.float32)[..., None]
        patch = (grid * keep).sum(axis=(1, 2)) / (grid.shape[1] * grid.shape[2])
        return np.concatenate([split.read("prefix")[:, 0].astype(np.float32), patch], axis=1)

    head = LinearHead(lr=1e-3, weight_decay=1e-2, seed=0).fit(features(train), train.read("labels"))
    pred = head.predict(features(wb))
    labels, place, bird = wb.read("labels"), wb.read("place"), wb.read("waterbird")
    got = record["metrics"]["waterbirds/original"]
    assert got["top1"] == pytest.approx(accuracy(labels, pred), abs=1e-9)
    assert got["n"] == len(labels)
    water = place == 1
    assert got["by_place"]["water"] == pytest.approx(accuracy(labels[water], pred[water]))
    groups = [accuracy(labels[(bird == b) & (place == p)], pred[(bird == b) & (place == p)])
              for b in (0, 1) for p in (0, 1) if ((bird == b) & (place == p)).any()]
    assert got["worst_group"] == pytest.approx(min(groups))


def test_pooled_cache_and_record_reuse(small_demo, monkeypatch):
    out, _ = small_demo
    first = fit("test_convnext", features=out / "features", mask="late", results=out / "results")
    assert first.get("reused")  # the demo already made this exact fit

    def no_spatial_reads(*args, **kwargs):
        raise AssertionError("pooling ran again instead of using the cache")

    monkeypatch.setattr(fit_module, "pool", no_spatial_reads)
    knn = fit("test_convnext", features=out / "features", mask="late", classifier="knn",
              results=out / "results")
    assert not knn.get("reused") and knn["config"]["recipe"] == "select-on-val"
    assert set(knn["metrics"]) == {"cub/original", "waterbirds/original", "cub/masked",
                                   "waterbirds/masked"}
    assert "k" in knn["chosen"]


def test_validation_rows_come_from_train_only(small_demo, monkeypatch):
    from probe.heads import LogRegHead

    out, _ = small_demo
    store = _store(out, "test_vit")
    train = store.split("train")
    features = {tuple(np.round(r, 4)): i for i, r in enumerate(fit_module.pooled(
        store, train, fit_module.pool_spec(head="cls+patch", mask="none", stage="L",
                                           mask_source="gt", fg_rule="seed", fg_threshold=0.5,
                                           pooling="mean")))}
    seen = {}
    real = LogRegHead.fit_select

    def spy(self, X_train, y_train, X_val, y_val, X_full, y_full):
        seen.update(train=X_train, val=X_val, full=X_full)
        return real(self, X_train, y_train, X_val, y_val, X_full, y_full)

    monkeypatch.setattr(LogRegHead, "fit_select", spy)
    record = fit("test_vit", features=out / "features", classifier="logreg",
                 results=out / "results", force=True)
    rows = {k: [features[tuple(np.round(r, 4))] for r in v] for k, v in seen.items()}
    held = stratified_holdout(train.read("ids"), train.read("labels"))
    assert sorted(rows["val"]) == sorted(np.flatnonzero(held))  # only train rows, the held-out ones
    assert set(rows["train"]).isdisjoint(rows["val"])
    assert sorted(rows["full"]) == list(range(len(held)))  # the refit sees all of train
    assert record["chosen"]["C"] in np.logspace(-3, 2, 6)
    assert record["metrics"]["cub/original"]["n"] == store.split("test").rows


def test_errors_name_the_fix(small_demo, tmp_path):
    out, _ = small_demo
    with pytest.raises(ProbeError, match="probe dump --backbone test_vit --data ROOT --input masked"):
        fit("test_vit", features=tmp_path, dataset="birds", mask="early")
    with pytest.raises(ProbeError, match="has no CLS token; use --head patch"):
        fit("test_convnext", features=out / "features", head="cls")
    with pytest.raises(ProbeError, match="--stage L-1 only applies to --mask late"):
        fit("test_vit", features=out / "features", stage="L-1")


def test_cli_fit_prints_every_eval_set(small_demo):
    out, _ = small_demo
    result = CliRunner().invoke(main, ["fit", "--backbone", "test_vit", "--mask", "early",
                                       "--features", str(out / "features"),
                                       "--results", str(out / "results")])
    assert result.exit_code == 0, result.output
    for name in ("cub/original", "cub/masked", "waterbirds/original", "waterbirds/masked"):
        assert name in result.output


def _tiny_store(path, rng):
    """A store of one 6-row split holding a 2x2 map and a prefix, written through the store API."""
    store = FeatureStore.create(path, {"backbone": "tiny"}, overwrite=True)
    split = store.create_split("train", 6, 64, {"ids": np.arange(6), "labels": np.arange(6) % 2})
    for name, tail in {"L": (2, 2, 4), "prefix": (1, 4)}.items():
        split.require(name, ArraySpec(tail, "float16"))[:] = rng.random((6, *tail))
    split.finish(["L", "prefix"])
    return store


def test_rebuilt_store_drops_the_old_pooled_caches(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "original.zarr"
    spec = PoolSpec("L", "cls+patch", "mean", None, "seed")
    store = _tiny_store(path, rng)
    first = fit_module.pooled(store, store.split("train"), spec)
    old_cache = store.cache_dir
    assert [p.name for p in (old_cache / "train").iterdir()] == [f"{spec.key()}.npy"]
    np.testing.assert_array_equal(np.load(old_cache / "train" / f"{spec.key()}.npy"), first)

    rebuilt = _tiny_store(path, rng)  # new values under the same path: the cache must not serve
    assert rebuilt.cache_dir != old_cache and not old_cache.exists()
    split = rebuilt.split("train")
    again = fit_module.pooled(rebuilt, split, spec)
    patch = split.read("L").astype(np.float32).mean(axis=(1, 2))
    np.testing.assert_allclose(again, np.concatenate([split.read("prefix")[:, 0], patch], 1),
                               rtol=1e-6)
    assert [p.name for p in FeatureStore.caches_of(path).iterdir()] == [rebuilt.attrs["store_id"]]


def test_a_rebuilt_split_drops_its_pooled_caches(tmp_path):
    """`--views K` with another K rebuilds `train.aug` in place: its old pooled rows must go."""
    rng = np.random.default_rng(1)
    store = _tiny_store(tmp_path / "original.zarr", rng)
    spec = PoolSpec("L", "patch", "mean")
    index = {"ids": np.arange(3), "labels": np.arange(3) % 2}
    split = store.create_split("train.aug", 3, 64, index)
    split.require("L", ArraySpec((2, 2, 4), "float16"))[:] = rng.random((3, 2, 2, 4))
    split.finish(["L"])
    assert fit_module.pooled(store, split, spec).shape == (3, 4)
    index = {"ids": np.arange(5), "labels": np.arange(5) % 2}
    split = store.create_split("train.aug", 5, 64, index, replace=True)
    split.require("L", ArraySpec((2, 2, 4), "float16"))[:] = rng.random((5, 2, 2, 4))
    split.finish(["L"])
    np.testing.assert_allclose(fit_module.pooled(store, split, spec),
                               split.read("L").astype(np.float32).mean(axis=(1, 2)), rtol=1e-6)


def _dump(root, out, **kw):
    from probe.dump import dump

    return dump("test_vit", root, out=out, random_init=True, image_size=64, workers=0,
                device="cpu", progress=False, **kw)


def test_a_store_that_gained_an_evaluation_set_is_fitted_again(synth_root, tmp_path):
    features, results = tmp_path / "features", tmp_path / "results"
    _dump(synth_root, features, splits=["train", "test"])
    first = fit("test_vit", features=features, results=results, progress=False)
    assert set(first["metrics"]) == {"cub/original"}
    assert fit("test_vit", features=features, results=results, progress=False)["reused"]
    _dump(synth_root, features, splits=["waterbirds"])
    again = fit("test_vit", features=features, results=results, progress=False)
    assert not again.get("reused") and again["id"] == first["id"]  # same experiment, rescored
    assert set(again["metrics"]) == {"cub/original", "waterbirds/original"}
    assert again["metrics"]["cub/original"] == first["metrics"]["cub/original"]
    assert len(list((results / "runs").glob("*.json"))) == 1


def test_stores_built_differently_are_not_mixed(synth_root, tmp_path):
    from probe.errors import ConfigMismatchError

    features = tmp_path / "features"
    _dump(synth_root, features, splits=["train", "test"])
    from probe.dump import dump

    dump("test_vit", synth_root, out=features, input="masked", random_init=True, image_size=32,
         workers=0, device="cpu", progress=False, splits=["train", "test"])
    with pytest.raises(ConfigMismatchError, match=r"image_size: original.zarr has 64, "
                                                  r"masked-gt.zarr has 32"):
        fit("test_vit", features=features, results=tmp_path / "results", progress=False)


def _run_printed_command(error: str) -> None:
    """Run the `probe dump ...` line an error message suggests, as a user would paste it."""
    import shlex

    line = error.split("add it with:\n  ")[1].strip()
    assert line.startswith("probe dump ")
    result = CliRunner().invoke(main, shlex.split(line)[1:] + ["--workers", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output


def test_missing_arrays_name_the_dump_that_adds_them(synth_root, tmp_path):
    """A store without the L-1 recomputation (or one dumped before the masked run's CLS was
    stored): the error gives the dump command, which adds only what is missing; pasted as it
    is, it completes the store in place (same weights, size, views and folder)."""
    features, results = tmp_path / "features", tmp_path / "results"
    path = _dump(synth_root, features, splits=["train", "test"], views=1)
    late_l1 = dict(features=features, results=results, mask="late", stage="L-1", progress=False,
                   views=1)
    with pytest.raises(ProbeError, match=r"lacks L.from-masked-L-1.gt; add it with:\n  probe dump "
                                         r"--backbone test_vit --data \S+ --random-init "
                                         r"--image-size 64 --views 1 --out \S+ --taps "
                                         r"L,L.from-masked-L-1 --masks gt") as err:
        fit("test_vit", **late_l1)
    _run_printed_command(str(err.value))
    store = FeatureStore.open(path, mode="a")
    del store.group["train"]["prefix.L.from-masked-L-1.gt"]  # as dumped by an older probe
    with pytest.raises(ProbeError, match="lacks prefix.L.from-masked-L-1.gt; add it with") as err:
        fit("test_vit", **late_l1)
    _run_printed_command(str(err.value))
    record = fit("test_vit", **late_l1)
    # the pasted command dumps the default splits, Waterbirds included
    assert set(record["metrics"]) == {"cub/original", "waterbirds/original"}
    assert record["config"]["stage"] == "L-1"
    assert record["config"]["prefix"] == "prefix.L.from-masked-L-1.gt"  # not an older record's
    assert "prefix" not in fit("test_vit", **{**late_l1, "head": "patch"})["config"]
