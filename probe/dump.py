"""`probe dump`: run a frozen backbone once per image and keep its spatial features in Zarr.

Batches never cross a chunk boundary and always start at the same rows, so an interrupted dump
resumed chunk by chunk, or split over torchrun ranks by chunk, computes exactly the same numbers as
one uninterrupted run. Decoding runs in DataLoader workers and writing in a background thread, so
the model never waits on the disk.
"""

import errno
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from probe.backbones import MASKED, create_backbone
from probe.data.cub import CUB, WATERBIRDS_DIRNAME, waterbirds_fingerprint
from probe.data.images import load_rgb
from probe.data.loading import guarded_loader
from probe.data.masks import MaskSource, early_mask
from probe.data.transforms import (
    STUDY_RAND_AUGMENT,
    Preprocess,
    TrainTransform,
    mask_to_grid,
    seeded,
)
from probe.errors import ProbeError
from probe.results import jsonable
from probe.store import (
    ArraySpec,
    FeatureStore,
    Split,
    fg_array_name,
    prefix_array_name,
    safe_name,
    store_path,
)

AUG_SPLIT = "train.aug"  # K augmented views of every train image, with a view index
TAPS = ("L", "L-1", MASKED)


def default_dataset_name(root: str | Path) -> str:
    """`cub` for the real CUB-200-2011 folder, otherwise the folder's name."""
    name = Path(root).expanduser().resolve().name
    return "cub" if name.lower().startswith("cub_200_2011") else safe_name(name)


def input_name(input: str, masks: MaskSource) -> str:
    if input == "original":
        return "original"
    if input != "masked":
        raise ProbeError(f"--input must be 'original' or 'masked', got {input!r}")
    if masks.kind == "none":
        raise ProbeError("--input masked needs a mask source: pass --masks gt or --masks dir:PATH")
    return f"masked-{masks.name}"


def view_seed(image_id: int, view: int) -> int:
    """An augmented view's randomness depends only on (image id, view): not on worker or rank."""
    return int(np.random.SeedSequence([image_id, view]).generate_state(1)[0])


class _Items(torch.utils.data.Dataset):
    """Decoded, preprocessed rows of one split: what a DataLoader worker produces.

    With `views` = K > 0, row r is augmented view r % K of image r // K (split `train.aug`).
    """

    def __init__(self, cub: CUB, preprocess: Preprocess, need_image: bool,
                 early: MaskSource | None, fg: MaskSource | None, views: int = 0):
        self.cub, self.preprocess, self.need_image = cub, preprocess, need_image
        self.early, self.fg, self.views = early, fg, views
        # the study's frozen-recipe training transform (Table 1)
        self.augment = TrainTransform(preprocess.image_size, preprocess.mean, preprocess.std,
                                      STUDY_RAND_AUGMENT, 0.25) if views else None
        self.waterbirds = cub.split == "waterbirds"

    def __len__(self):
        return len(self.cub) * max(self.views, 1)

    def _load_mask(self, source: MaskSource, i: int, size) -> np.ndarray:
        return source.load(self.cub.root, self.cub.paths[i], size, self.waterbirds)

    def __getitem__(self, row: int) -> dict:
        i, view = divmod(row, self.views) if self.views else (row, None)
        path = self.cub.image_path(i)
        item = {"row": row}
        if self.need_image:
            image = load_rgb(path)
            if self.early is not None:
                image = early_mask(image, self._load_mask(self.early, i, image.size))
            size = image.size
        else:
            with Image.open(path) as im:  # reads the header only
                size = im.size
        mask = self._load_mask(self.fg, i, size) if self.fg is not None else None
        if view is not None:
            pil_mask = None if mask is None else Image.fromarray(mask.astype(np.uint8) * 255)
            with seeded(view_seed(int(self.cub.ids[i]), view)):
                item["image"], nearest = self.augment(image, pil_mask)
            area = nearest  # the augmented mask is binary at pixel level: its mean is the area
        else:
            if self.need_image:
                item["image"] = self.preprocess.image(image)
            area, nearest = self.preprocess.mask(mask) if mask is not None else (None, None)
        if mask is not None:
            item["fg_area"], item["fg_nearest"] = area, nearest
        return item


class _Batches(torch.utils.data.Sampler):
    """Row batches that start at fixed offsets inside each chunk (see module docstring)."""

    def __init__(self, split: Split, chunks: list[int], batch_size: int):
        self.batches = [list(range(s, min(s + batch_size, e)))
                        for c in chunks for s, e in [split.chunk_range(c)]
                        for s in range(s, e, batch_size)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1

    def barrier(self):
        if self.world > 1:
            try:
                dist.barrier()
            except RuntimeError:  # gloo/nccl report a peer that exited as a transport error
                raise ProbeError("another torchrun rank stopped; its error is printed above") from None


def runtime(device: str) -> Runtime:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ProbeError("--device cuda was requested but no CUDA GPU is visible; use --device cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Runtime(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return Runtime(torch.device("cuda", local), dist.get_rank(), world)
    return Runtime(torch.device("cpu"), dist.get_rank(), world)


def _to_float16(name: str, x: torch.Tensor, ids: np.ndarray) -> np.ndarray:
    x = x.float().cpu()
    half = x.half()
    bad = ~torch.isfinite(half.reshape(len(half), -1)).all(dim=1)
    if bad.any():
        raise ProbeError(f"{name} overflows float16 (inf/NaN) for image ids "
                         f"{ids[bad.numpy()].tolist()[:20]}; the model or the image is broken")
    return half.numpy()


def _write_chunk(split: Split, progress, chunk: int, arrays: dict[str, np.ndarray]) -> None:
    start, end = split.chunk_range(chunk)
    try:
        for name, values in arrays.items():
            split.group[name][start:end] = values
        progress[chunk] = 1  # only now is the chunk complete: a crash before leaves it pending
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise ProbeError(f"disk full while writing {split.group.store}; free some space and "
                             "run the same command again: finished chunks are kept") from None
        raise


def _plan_arrays(backbone, taps: list[str], fg_source: MaskSource | None) -> dict[str, ArraySpec]:
    specs = {}
    for tap in taps:
        name = f"{MASKED}.{fg_source.name}" if tap == MASKED else tap
        specs[name] = ArraySpec((*backbone.grid(tap), backbone.dim(tap)), "float16")
    if backbone.num_prefix_tokens:
        prefix = ArraySpec((backbone.num_prefix_tokens, backbone.dim("L")), "float16")
        specs |= {prefix_array_name(name): prefix for name in specs if name.startswith(MASKED)}
        specs["prefix"] = prefix
    return specs


def _fg_specs(grids: set[tuple[int, int]], fg_source: MaskSource) -> dict[str, ArraySpec]:
    return {fg_array_name(fg_source.name, g, rule): ArraySpec(g, "float16")
            for g in sorted(grids) for rule in ("area", "seed")}


def _run_split(split: Split, items: _Items, specs: dict[str, ArraySpec], backbone, rt: Runtime,
               batch_size: int, workers: int, progress_bar: bool) -> None:
    pending = [n for n in specs if not split.complete(n)]
    if not pending:
        return
    for name in pending:  # rank 0 creates arrays and progress flags; the others open them
        if rt.rank == 0:
            split.require(name, specs[name])
    progress = split.progress(pending) if rt.rank == 0 else None
    rt.barrier()
    progress = progress if progress is not None else split.progress(pending)
    done = progress[:]
    chunks = [c for c in range(split.n_chunks) if c % rt.world == rt.rank and not done[c]]
    masked_run = (MASKED, prefix_array_name(MASKED))  # array names: these, then ".<mask>"
    taps = [n for n in pending if n in TAPS or n.startswith(masked_run)]
    need_forward = bool(taps) or "prefix" in pending
    loader = guarded_loader(items, batch_sampler=_Batches(split, chunks, batch_size),
                            num_workers=workers, pin_memory=rt.device.type == "cuda")
    ids = split.read("ids")
    todo = sum(split.chunk_range(c)[1] - split.chunk_range(c)[0] for c in chunks)
    bar = tqdm(total=todo, desc=f"{split.name}", unit="img", disable=not progress_bar or rt.rank)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if rt.device.type == "cuda"
                else nullcontext())
    buffers: dict[int, dict[str, list]] = {}
    futures: list[Future] = []
    with ThreadPoolExecutor(max_workers=1) as writer:
        for batch in loader:
            rows = batch["row"].numpy()
            chunk = int(rows[0]) // split.chunk_rows
            out = {}
            if need_forward:
                x = batch["image"].to(rt.device, non_blocking=True)
                if backbone.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                keep = None
                if any(t.startswith(masked_run) for t in taps):
                    keep = mask_to_grid(batch["fg_nearest"], backbone.grid("L-1"), "seed").to(rt.device)
                base_taps = [t for t in ("L", "L-1", "prefix") if t in pending]
                with torch.inference_mode(), autocast:
                    feats = backbone.forward_taps(x, taps=base_taps, lm1_keep=keep)
                for name in pending:  # stored names carry the mask source after MASKED
                    key = next((k for k in masked_run if name.startswith(k)), name)
                    if key in feats:
                        out[name] = _to_float16(name, feats[key], ids[rows])
            for name in pending:
                if name.startswith(("fg.", "fgseed.")):
                    rule = "area" if name.startswith("fg.") else "seed"
                    grid = specs[name].tail
                    mask = batch["fg_area" if rule == "area" else "fg_nearest"]
                    out[name] = mask_to_grid(mask, grid, rule).half().numpy()
            buffer = buffers.setdefault(chunk, {n: [] for n in pending})
            for name in pending:
                buffer[name].append(out[name])
            start, end = split.chunk_range(chunk)
            if rows[-1] == end - 1:  # the chunk's last batch: hand it to the writer thread
                arrays = {n: np.concatenate(v) for n, v in buffers.pop(chunk).items()}
                futures.append(writer.submit(_write_chunk, split, progress, chunk, arrays))
                while len(futures) > 2:  # bounded memory: at most two chunks in flight
                    futures.pop(0).result()
            bar.update(len(rows))
        for future in futures:
            future.result()
    bar.close()
    rt.barrier()
    if rt.rank == 0:
        if not progress[:].all():
            raise ProbeError(f"split {split.name}: some chunks were not written; run again to resume")
        split.finish(pending)
    rt.barrier()


def dataset_splits(root: Path, splits, waterbirds_root) -> list[str]:
    if splits:
        return list(splits)
    wb = Path(waterbirds_root or root / WATERBIRDS_DIRNAME)
    return ["train", "test"] + (["waterbirds"] if wb.is_dir() else [])


def check_masks(cub: CUB, source: MaskSource) -> None:
    """Every image of the split has a mask of its size (headers only: fails before any work)."""
    waterbirds = cub.split == "waterbirds"
    missing = source.missing(cub.root, cub.paths, waterbirds)
    if missing:
        listed = "\n  ".join(str(p) for p in missing[:10])
        raise ProbeError(f"{len(missing)} of {len(cub)} images of split {cub.split!r} have no mask "
                         f"in source {source.spec!r}:\n  {listed}"
                         + ("\n  ..." if len(missing) > 10 else ""))
    wrong = []
    for i, rel in enumerate(cub.paths):
        mask_path = source.path(cub.root, rel, waterbirds)
        with Image.open(cub.image_path(i)) as image, Image.open(mask_path) as mask:
            if image.size != mask.size:
                wrong.append(f"{mask_path} is {mask.size[0]}x{mask.size[1]}, its image "
                             f"{image.size[0]}x{image.size[1]}")
    if wrong:
        raise ProbeError(f"{len(wrong)} masks of split {cub.split!r} differ in size from their "
                         "image; masks must have the image's size:\n  " + "\n  ".join(wrong[:10]))


def dump(backbone: str, data_root: str | Path, *, input: str = "original", masks: str = "gt",
         splits=None, taps=("L",), out: str | Path = "features", dataset: str | None = None,
         waterbirds_root=None, weights=None, random_init: bool = False, image_size=None,
         batch_size: int = 64, workers: int = 2, device: str = "auto", overwrite: bool = False,
         chunk_rows: int | None = None, views: int = 0, progress: bool = True,
         model_kwargs: dict | None = None) -> Path:
    """Dump the features of every image of `splits` into a store; returns the store's path.

    Resumes an interrupted dump; does nothing for arrays already complete.
    """

    root = Path(data_root).expanduser()
    source = MaskSource.parse(masks)
    taps = list(taps)
    if batch_size < 1 or workers < 0 or views < 0 or (chunk_rows is not None and chunk_rows < 1):
        raise ProbeError(f"need batch_size >= 1, workers >= 0, views >= 0 and chunk_rows >= 1; got "
                         f"{batch_size}, {workers}, {views}, {chunk_rows}")
    unknown = [t for t in taps if t not in TAPS]
    if unknown:
        raise ProbeError(f"unknown taps {unknown}; choose from {', '.join(TAPS)}")
    if MASKED in taps and source.kind == "none":
        raise ProbeError(f"tap {MASKED} needs a mask source (--masks gt or dir:PATH)")
    name = input_name(input, source)
    rt = runtime(device)
    model = create_backbone(backbone, weights=weights, random_init=random_init,
                            image_size=image_size, **(model_kwargs or {}))
    if unsupported := [t for t in taps if t not in model.taps]:  # before any store is written
        raise ProbeError(f"backbone {backbone} ({model.kind}) has no tap(s) {unsupported}; "
                         f"its taps: {', '.join(model.taps)}")
    model.to(rt.device)
    if model.channels_last:
        model.to(memory_format=torch.channels_last)
    preprocess = Preprocess(model.image_size, tuple(model.mean), tuple(model.std))
    dataset = dataset or default_dataset_name(root)
    cub_index = CUB(root, "train").index
    attrs = {"dataset": dataset, "dataset_fingerprint": cub_index.fingerprint(),
             "backbone": backbone, "model_id": model.model_id, "weights": model.weights_id,
             "image_size": model.image_size, "mean": list(model.mean), "std": list(model.std),
             "transform": preprocess.describe(), "input": name,
             "input_mask_source": source.spec if input == "masked" else None,
             "kind": model.kind, "num_prefix_tokens": model.num_prefix_tokens,
             "head_norm": json.loads(json.dumps(model.head_norm(), default=jsonable)),
             "data_root": str(root.resolve())}
    split_names = dataset_splits(root, splits, waterbirds_root)
    if "waterbirds" in split_names:
        attrs["waterbirds_fingerprint"] = waterbirds_fingerprint(
            Path(waterbirds_root or root / WATERBIRDS_DIRNAME))
    path = store_path(out, dataset, backbone, name)
    # rank 0 alone checks and creates: another rank could see the group half-written
    store = FeatureStore.create(path, attrs, overwrite) if rt.rank == 0 else None
    if store is not None and source.kind != "none":
        store.register_mask_source(source.name, source.spec)
    rt.barrier()
    store = store or FeatureStore.open(path, mode="a")
    specs = _plan_arrays(model, taps, source if source.kind != "none" else None)
    if source.kind != "none":
        grids = {model.grid(t) for t in taps} | {model.grid("L")}
        specs.update(_fg_specs(grids, source))
    row_bytes = max(int(np.prod(s.tail)) * 2 for s in specs.values())
    wrote = False
    if views and "train" in split_names:
        split_names.append(AUG_SPLIT)
    for split_name in split_names:
        k = views if split_name == AUG_SPLIT else 0
        cub = CUB(root, "train" if k else split_name, waterbirds_root=waterbirds_root)
        if source.kind != "none":
            check_masks(cub, source)
        index = {"ids": np.repeat(cub.ids, max(k, 1)), "labels": np.repeat(cub.labels, max(k, 1))}
        if k:
            index["view"] = np.tile(np.arange(k), len(cub))
        if cub.waterbird is not None:
            index.update(waterbird=cub.waterbird, place=cub.place)
        split = (store.create_split(split_name, len(index["ids"]), row_bytes, index, chunk_rows,
                                    batch_size, replace=bool(k))  # another --views K: rebuild
                 if rt.rank == 0 else None)
        rt.barrier()
        split = split or store.split(split_name)
        if all(split.complete(n) for n in specs):
            continue
        wrote = True
        items = _Items(cub, preprocess, need_image=True,
                       early=source if input == "masked" else None,
                       fg=source if source.kind != "none" else None, views=k)
        _run_split(split, items, specs, model, rt, batch_size, workers, progress)
    if not wrote and rt.rank == 0 and progress:
        print(f"{path}: already complete, nothing to do")
    return path


def add_masks(store: str | Path, data_root: str | Path, masks: str, *, waterbirds_root=None,
              batch_size: int = 64, workers: int = 2, progress: bool = True) -> Path:
    """Add the foreground maps of another mask source to an existing store (no model forward)."""
    source = MaskSource.parse(masks)
    if source.kind == "none":
        raise ProbeError("--add-masks needs a mask source: gt or dir:PATH")
    fs = FeatureStore.open(store, mode="a")
    fs.register_mask_source(source.name, source.spec)
    attrs = fs.attrs
    preprocess = Preprocess(attrs["image_size"], tuple(attrs["mean"]), tuple(attrs["std"]))
    early = MaskSource.parse(attrs["input_mask_source"]) if attrs.get("input_mask_source") else None
    root = Path(data_root).expanduser()
    rt = Runtime(torch.device("cpu"))
    for split_name in fs.splits():
        split = fs.split(split_name)
        grids = {tuple(split.group[n].shape[1:3]) for n in split.names() if n in TAPS}
        k = int(split.read("view").max(initial=-1)) + 1 if split_name == AUG_SPLIT else 0
        cub = CUB(root, "train" if k else split_name, waterbirds_root=waterbirds_root)
        if not np.array_equal(np.repeat(cub.ids, max(k, 1)), split.read("ids")):
            raise ProbeError(f"{root} does not hold the images of split {split_name!r} of {store}")
        check_masks(cub, source)
        # an augmented view's geometry is drawn from the decoded image, so views decode it
        items = _Items(cub, preprocess, need_image=bool(k), early=early, fg=source, views=k)
        _run_split(split, items, _fg_specs(grids, source), None, rt, batch_size, workers, progress)
    return Path(store)
