"""`probe fit`: one frozen-backbone experiment = a pooling of stored features + a head.

The train store is the original-input store (baseline, late masking) or the masked-input store
(early masking). The fitted head is evaluated on every evaluation set the stores offer: CUB test
and Waterbirds, each on original and masked inputs, with the same pooling (so late masking is
applied at test time when it was applied in training). Pooled arrays are cached next to the
store, so a second fit with the same pooling does not read the spatial tensors again.
"""

import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from probe.backbones import MASKED
from probe.data.masks import mask_name
from probe.data.splits import stratified_holdout
from probe.dump import AUG_SPLIT, default_dataset_name
from probe.errors import ConfigMismatchError, ProbeError
from probe.files import atomic
from probe.heads import FROZEN_RECIPES, make_head
from probe.metrics import eval_metrics
from probe.pooling import PoolSpec, pool
from probe.results import find_record, write_record
from probe.store import (
    IDENTITY_FIELDS,
    FeatureStore,
    Split,
    identity_differences,
    safe_name,
    store_path,
)

STRATEGIES = {"none": "baseline", "early": "early", "late": "late"}
EVAL_SPLITS = {"test": "cub", "waterbirds": "waterbirds"}


def _needed(split: Split, spec: PoolSpec) -> list[str]:
    """The arrays `spec` pools from in `split` (fg maps are named by the tap's grid)."""
    names = [spec.tap] + ([spec.prefix_array] if spec.representation != "patch" else [])
    if spec.mask and split.complete(spec.tap):
        names.append(spec.fg_array(*split.group[spec.tap].shape[1:3]))
    return names


def pooled(store: FeatureStore, split: Split, spec: PoolSpec, rows: np.ndarray | None = None,
           progress: bool = False) -> np.ndarray:
    """Pooled float32 [N, D'] of a split, streamed chunk by chunk and cached on disk."""
    cache = store.cache_dir / split.name / f"{spec.key()}.npy"
    if cache.is_file():
        values = np.load(cache)
    else:
        tap = split[spec.tap]
        prefix = split[spec.prefix_array] if spec.representation != "patch" else None
        fg = split[spec.fg_array(*tap.shape[1:3])] if spec.mask else None
        head_norm = store.attrs.get("head_norm") if spec.representation == "patch" else None
        parts = []
        for chunk in tqdm(range(split.n_chunks), desc=f"pool {split.name}", unit="chunk",
                          disable=not progress, leave=False):
            lo, hi = split.chunk_range(chunk)
            parts.append(pool(tap[lo:hi], representation=spec.representation, spatial=spec.spatial,
                              prefix=None if prefix is None else prefix[lo:hi],
                              keep=None if fg is None else spec.keep(fg[lo:hi]),
                              head_norm=head_norm))
        values = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
        with atomic(cache) as tmp, open(tmp, "wb") as f:  # parallel fits may cache one spec
            np.save(f, values)
    return values if rows is None else values[rows]


def _find_dataset(features: Path, backbone: str, data_root) -> str:
    if data_root is not None:
        return default_dataset_name(data_root)
    found = sorted(p.parent.name for p in features.glob(f"*/{safe_name(backbone)}"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ProbeError(f"no feature stores of {backbone} under {features}; create them with "
                         f"`probe dump --backbone {backbone} --data ROOT` (or pass --features)")
    raise ProbeError(f"{features} holds stores of {backbone} for several datasets ({', '.join(found)}); "
                     "pass --dataset NAME (or --data ROOT)")


def _open_store(features, dataset, backbone, input_name, data_root, required: bool):
    path = store_path(features, dataset, backbone, input_name)
    if (path / "zarr.json").is_file():
        return FeatureStore.open(path)
    if not required:
        return None
    masked = input_name.startswith("masked-")
    cmd = (f"probe dump --backbone {backbone} --data {data_root or 'ROOT'}"
           + (f" --input masked --masks {input_name[len('masked-'):]}" if masked else "")
           + ("" if Path(features) == Path("features") else f" --out {features}"))
    raise ProbeError(f"no feature store {path}; create it with:\n  {cmd}")


def _redump_command(store: FeatureStore, features, extra: str) -> str:
    """The dump command that completes ``store`` as it was built (same data, weights, size,
    input and views): run again, a dump writes only the arrays a store lacks."""
    a = store.attrs
    root = a.get("data_root") or "ROOT"
    parts = ["probe dump", f"--backbone {a['backbone']}", f"--data {root}"]
    if root != "ROOT" and a["dataset"] != default_dataset_name(root):
        parts.append(f"--dataset {a['dataset']}")
    weights = str(a.get("weights"))
    parts += (["--random-init"] if weights == "random-init"
              else ["--weights FILE"] if weights.startswith("file:") else [])
    parts.append(f"--image-size {a['image_size']}")
    if a.get("input_mask_source"):
        parts.append(f"--input masked --masks {a['input_mask_source']}")
    if store.has_split(AUG_SPLIT):
        parts.append(f"--views {int(store.split(AUG_SPLIT).read('view').max(initial=-1)) + 1}")
    if Path(features) != Path("features"):
        parts.append(f"--out {features}")
    return " ".join(parts) + extra


def _require_arrays(store: FeatureStore, split: Split, spec: PoolSpec, features) -> None:
    """The split holds what `spec` pools, else: the dump command that adds it."""
    missing = [n for n in _needed(split, spec) if not split.complete(n)]
    if not split.complete(spec.tap):
        missing = [spec.tap]  # its grid names the foreground map needed with it
    if not missing:
        return
    spec_of = (store.attrs.get("mask_sources") or {}).get  # short name -> gt or dir:PATH
    if spec.tap.startswith(MASKED):
        name = spec.tap[len(MASKED) + 1:]
        extra = f" --taps L,{MASKED}" + ("" if store.attrs.get("input_mask_source")
                                         else f" --masks {spec_of(name, name)}")
    elif spec.mask is not None:
        extra = f" --add-masks {spec_of(spec.mask, spec.mask)}"
    else:
        extra = ""
    raise ProbeError(f"split {split.name!r} of {store.path} lacks {', '.join(missing)}; add it "
                     f"with:\n  {_redump_command(store, features, extra)}")


def pool_spec(*, head: str, mask: str, stage: str, mask_source: str, fg_rule: str,
              fg_threshold: float, pooling: str) -> PoolSpec:
    """The pooling that realises one (strategy, stage, head, pooling variant) of the study."""
    if mask not in STRATEGIES:
        raise ProbeError(f"--mask must be one of {list(STRATEGIES)}, got {mask!r}")
    if stage not in ("L", "L-1"):
        raise ProbeError(f"--stage must be L or L-1, got {stage!r}")
    if stage == "L-1" and mask != "late":
        raise ProbeError("--stage L-1 only applies to --mask late")
    if pooling not in ("mean", "fgmean", "bg"):
        raise ProbeError(f"--pooling must be mean, fgmean or bg, got {pooling!r}")
    if stage == "L-1":  # masked before the last stage; the head then pools all cells, no 2nd mask
        if pooling != "mean":
            raise ProbeError("--stage L-1 pools the recomputed last stage plainly: use --pooling mean")
        if fg_rule != "seed":
            raise ProbeError("--stage L-1 uses the mask the dump applied with the seed's rule; "
                             "--fg-rule area applies to late masking at L only")
        return PoolSpec(f"{MASKED}.{mask_source}", head, "mean")
    spatial = pooling if pooling != "mean" else ("late" if mask == "late" else "mean")
    if spatial == "mean":
        return PoolSpec("L", head, "mean")
    return PoolSpec("L", head, spatial, mask_source, fg_rule, fg_threshold)


def _make_head(classifier: str, recipe: str, kind: str, seed: int, device: str, progress: bool):
    if classifier == "linear":
        family = "vit" if kind in ("vit", "hf") else "convnext"
        params = {**FROZEN_RECIPES[family], "seed": seed, "device": device, "verbose": progress}
        if recipe not in ("paper", "sweep"):
            raise ProbeError(f"--recipe must be paper or sweep, got {recipe!r}")
        return make_head("linear", **params)
    if classifier in ("logreg", "knn"):
        return make_head(classifier, **({"seed": seed} if classifier == "logreg" else {}))
    raise ProbeError(f"--classifier must be linear, logreg or knn, got {classifier!r}")


def fit(backbone: str, *, features: str | Path = "features", dataset: str | None = None,
        data_root=None, head: str = "auto", mask: str = "none", stage: str = "L",
        mask_source: str = "gt", fg_rule: str = "seed", fg_threshold: float = 0.5,
        pooling: str = "mean", classifier: str = "linear", recipe: str = "paper", views: int = 0,
        seed: int = 0, results: str | Path = "results", force: bool = False,
        device: str = "cpu", progress: bool = True) -> dict:
    """Fit one head on stored features and evaluate it everywhere; returns the run record.

    An identical earlier fit is reused (its record returned) unless `force`. ``progress``:
    progress bars while pooling a store for the first time and while training a linear head.
    """
    features = Path(features)
    mask_source = mask_name(mask_source)
    dataset = dataset or _find_dataset(features, backbone, data_root)
    masked_name = f"masked-{mask_source}"
    train_name = masked_name if mask == "early" else "original"
    train_store = _open_store(features, dataset, backbone, train_name, data_root, required=True)
    kind = train_store.attrs.get("kind", "vit")
    if stage == "L-1" and kind == "hf":
        raise ProbeError(f"{backbone}: transformers backbones cannot rerun their last stage on a "
                         "masked L-1 map; use the timm model of the same weights (e.g. vit_b)")
    if head == "auto":
        head = "cls+patch" if train_store.attrs.get("num_prefix_tokens") else "patch"
    if head != "patch" and not train_store.attrs.get("num_prefix_tokens"):
        raise ProbeError(f"{backbone} has no CLS token; use --head patch (GAP, the study's ConvNeXt head)")
    spec = pool_spec(head=head, mask=mask, stage=stage, mask_source=mask_source, fg_rule=fg_rule,
                     fg_threshold=fg_threshold, pooling=pooling)
    uses_mask = spec.mask is not None or stage == "L-1"
    names = {"original": "original", "masked": masked_name}
    order = ("masked", "original") if mask == "early" else ("original", "masked")  # own input first
    eval_stores = {k: _open_store(features, dataset, backbone, names[k], data_root, False) for k in order}
    config = {
        "dataset": dataset, "backbone": backbone, "regime": "frozen",
        "strategy": STRATEGIES[mask], "stage": stage if mask == "late" else None,
        "representation": head, "pooling": pooling, "mask_source": mask_source,
        "fg_rule": (fg_rule if fg_rule == "seed" else f"area>={fg_threshold}") if uses_mask else None,
        "train_input": "masked" if mask == "early" else "original", "classifier": classifier,
        "recipe": recipe if classifier == "linear" else "select-on-val", "views": views, "seed": seed,
        "stores": {k: s.attrs.get("store_id") for k, s in eval_stores.items() if s is not None},
    }
    if spec.representation != "patch" and spec.prefix_array != "prefix":
        # the masked run's CLS: never reuse a record made when the plain run's CLS was pooled
        config["prefix"] = spec.prefix_array
    _check_same_build(train_store, eval_stores)
    train = train_store.split("train")
    _require_arrays(train_store, train, spec, features)  # never reuse what cannot be recomputed
    if views and train_store.has_split(AUG_SPLIT):
        _require_arrays(train_store, train_store.split(AUG_SPLIT), spec, features)
    evaluable = _eval_splits(eval_stores, spec)
    previous = None if force else find_record(config, results)
    if previous is not None and set(evaluable) <= set(previous["metrics"]):
        previous["reused"] = True
        return previous  # (a store that gained an evaluation set since is fitted again)

    started = time.perf_counter()
    X = pooled(train_store, train, spec, progress=progress)
    y, ids = train.read("labels"), train.read("ids")
    if views:
        X, y, ids = _with_views(train_store, spec, X, y, ids, views, progress)
    pooled_seconds = time.perf_counter() - started
    model = _make_head(classifier, recipe, kind, seed, device, progress)
    if classifier == "linear" and recipe == "paper":
        model.fit(X, y)
        chosen = {"lr": model.lr, "weight_decay": model.weight_decay, "epochs": model.epochs}
    else:  # choose on val only (a stratified 10% of train), then refit on all of train
        val = stratified_holdout(train.read("ids"), train.read("labels"))
        val_rows = np.concatenate([val, np.zeros(len(y) - len(val), bool)])  # views never in val
        fit_rows = ~np.isin(ids, train.read("ids")[val])  # nor views of val images in training
        model.fit_select(X[fit_rows], y[fit_rows], X[val_rows], y[val_rows], X, y)
        chosen = dict(model.chosen_)
    fit_seconds = time.perf_counter() - started - pooled_seconds

    metrics = {}
    for eval_name, (store, split) in evaluable.items():
        labels = split.read("labels")
        wb = "place" in split.names()
        metrics[eval_name] = eval_metrics(
            labels, model.predict(pooled(store, split, spec, progress=progress)),
            split.read("place") if wb else None, split.read("waterbird") if wb else None)
    record = {"kind": "fit", "config": config, "chosen": chosen, "metrics": metrics,
              "timings": {"pool_seconds": round(pooled_seconds, 3),
                          "fit_seconds": round(fit_seconds, 3),
                          "total_seconds": round(time.perf_counter() - started, 3)},
              "pool_spec": spec.key()}
    record["path"] = str(write_record(record, results))
    return record


def _eval_splits(eval_stores: dict, spec: PoolSpec) -> dict[str, tuple[FeatureStore, Split]]:
    """{"cub/original": (store, split), ...}: every evaluation set the stores can score now."""
    found = {}
    for test_input, store in eval_stores.items():
        for split_name, eval_name in EVAL_SPLITS.items():
            if store is None or not store.has_split(split_name):
                continue
            split = store.split(split_name)
            if all(split.complete(n) for n in _needed(split, spec)):  # e.g. no L-1 recomputation
                found[f"{eval_name}/{test_input}"] = (store, split)
    return found


def _check_same_build(train_store: FeatureStore, eval_stores: dict) -> None:
    """Original and masked-input stores are scored with one head: same model, weights, transform
    and images, only the input may differ."""
    fields = [f for f in IDENTITY_FIELDS if f not in ("input", "input_mask_source")]
    mine = train_store.attrs
    for store in eval_stores.values():
        if store is None or store is train_store:
            continue
        theirs = store.attrs
        diffs = [f"{f}: {train_store.path.name} has {mine.get(f)!r}, {store.path.name} has "
                 f"{theirs.get(f)!r}" for f in identity_differences(mine, theirs, fields)]
        if diffs:
            raise ConfigMismatchError(
                f"the feature stores of {train_store.path.parent} were built differently, so one "
                "head cannot be trained on one and scored on the other:\n  " + "\n  ".join(diffs)
                + "\ndump the odd one again with the other's options and --overwrite")


def _with_views(store: FeatureStore, spec: PoolSpec, X, y, ids, views: int, progress: bool):
    """Append the store's augmented train views (split `train.aug`) to the training rows."""
    if not store.has_split(AUG_SPLIT):
        raise ProbeError(f"{store.path} has no augmented views; dump them with --views {views}")
    aug = store.split(AUG_SPLIT)
    view = aug.read("view")
    rows = np.flatnonzero(view < views)
    if int(view.max(initial=-1)) + 1 < views:
        raise ProbeError(f"{store.path} holds {int(view.max(initial=-1)) + 1} views per image; "
                         f"asked for {views}; dump again with --views {views}")
    return (np.concatenate([X, pooled(store, aug, spec, rows, progress)]),
            np.concatenate([y, aug.read("labels")[rows]]), np.concatenate([ids, aug.read("ids")[rows]]))
