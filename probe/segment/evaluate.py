"""`probe segment eval`: IoU of any mask source against CUB's ground truth (segmentation > 0).

Per split, two summaries: over the split's pixel totals (the usual segmentation benchmark figure,
where large images weigh more) and the mean over images. Mean IoU is the mean of the background
and foreground IoUs. Waterbirds masks are compared with the CUB annotation of the same image:
Waterbirds pastes each bird at its original place. Percentages, like every metric of probe.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from probe.data.cub import CUB
from probe.data.loading import batches
from probe.data.masks import WATERBIRDS_SUBDIR, MaskSource
from probe.dump import check_masks, dataset_splits
from probe.errors import ProbeError

GT = MaskSource("gt")


def confusion(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """[true fg, false fg, missed fg, true bg] pixel counts of two bool masks."""
    return np.array([(pred & gt).sum(), (pred & ~gt).sum(), (~pred & gt).sum(),
                     (~pred & ~gt).sum()], dtype=np.int64)


def _iou(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    # an empty union means both masks agree there is nothing of that class: a perfect score
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def summarise(counts: np.ndarray) -> dict:
    """IoUs (%) from per-image confusions [N, 4]."""
    def ious(c):
        tp, fp, fn, tn = np.moveaxis(c, -1, 0)
        return _iou(tp, tp + fp + fn), _iou(tn, tn + fp + fn)

    fg, bg = ious(counts.sum(0))
    fg_img, bg_img = ious(counts)
    return {"n": len(counts), "miou": 50 * float(fg + bg), "fg_iou": 100 * float(fg),
            "bg_iou": 100 * float(bg), "miou_per_image": 50 * float(np.mean(fg_img + bg_img)),
            "fg_iou_per_image": 100 * float(np.mean(fg_img))}


class _Confusions(torch.utils.data.Dataset):
    def __init__(self, cub: CUB, source: MaskSource):
        self.cub, self.source = cub, source

    def __len__(self):
        return len(self.cub)

    def __getitem__(self, i) -> np.ndarray:
        with Image.open(self.cub.image_path(i)) as im:  # the header is enough for the size
            size = im.size
        rel, wb = self.cub.paths[i], self.cub.split == "waterbirds"
        pred = self.source.load(self.cub.root, rel, size, wb)
        return confusion(pred, GT.load(self.cub.root, rel, size))


def evaluate(data_root: str | Path, masks: str, *, splits=None, waterbirds_root=None,
             workers: int = 2, progress: bool = True) -> dict[str, dict]:
    """{split: IoU summary} of mask source `masks` (dir:PATH, or gt as a sanity check)."""
    root = Path(data_root).expanduser()
    source = MaskSource.parse(masks)
    if source.kind == "dir" and not source.folder.is_dir():
        raise ProbeError(f"mask folder {source.folder} does not exist")
    chosen = dataset_splits(root, splits, waterbirds_root)
    if source.kind == "dir" and not (source.folder / WATERBIRDS_SUBDIR).is_dir() and not splits:
        chosen = [s for s in chosen if s != "waterbirds"]  # it would re-score the CUB test masks
    sets = [CUB(root, split, masks=source, waterbirds_root=waterbirds_root) for split in chosen]
    for cub in sets:  # every missing file listed before any work
        check_masks(cub, GT)
        check_masks(cub, source)
    results = {}
    for split, cub in zip(chosen, sets):
        counts = []
        with tqdm(total=len(cub), desc=f"IoU {split}", unit="img", disable=not progress) as bar:
            for items in batches(_Confusions(cub, source), batch_size=32, workers=workers):
                counts.extend(items)
                bar.update(len(items))
        results[split] = summarise(np.stack(counts))
    return results
