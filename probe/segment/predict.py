"""`probe segment predict`: one PNG mask per image, at the image's original size, in the folder
layout probe.data.masks.MaskSource reads as `dir:PATH` (Waterbirds masks under `waterbirds/`).

Models see square inputs, CUB images are not square: each image is covered by square tiles of
side min(W, H) along its long side (each tile then goes through the usual Preprocess, whose
centre crop is a no-op on a square), so every pixel is predicted at the scale the model was
trained at. Tile scores are upsampled bilinearly to the tile and averaged where tiles overlap.
"""

import hashlib
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from probe.data.cub import CUB
from probe.data.images import load_rgb
from probe.data.loading import batches
from probe.data.masks import WATERBIRDS_SUBDIR
from probe.data.transforms import Preprocess
from probe.dump import dataset_splits, runtime
from probe.segment.files import atomic, claim_mask_folder
from probe.segment.models import WEIGHTS_FILE, load

# score(tiles [N, 3, S, S], tiles per image) -> scores [N, h, w]
Scorer = Callable[[torch.Tensor, list[int]], torch.Tensor]


def tile_boxes(width: int, height: int) -> list[tuple[int, int, int]]:
    """(x0, y0, side) squares of side min(W, H), evenly spaced, covering the whole image."""
    side, long = min(width, height), max(width, height)
    n = math.ceil(long / side)
    starts = [round(i * (long - side) / (n - 1)) for i in range(n)] if n > 1 else [0]
    return [(s, 0, side) if width >= height else (0, s, side) for s in starts]


def assemble(scores: torch.Tensor, boxes: list[tuple[int, int, int]], size: tuple[int, int]
             ) -> torch.Tensor:
    """Tile scores [n, h, w] -> one [H, W] score map of the whole image (size = (W, H))."""
    total, count = torch.zeros(size[1], size[0]), torch.zeros(size[1], size[0])
    for s, (x0, y0, side) in zip(scores, boxes):
        up = F.interpolate(s[None, None].float(), size=(side, side), mode="bilinear",
                           align_corners=False)[0, 0]
        total[y0:y0 + side, x0:x0 + side] += up
        count[y0:y0 + side, x0:x0 + side] += 1
    return total / count


@dataclass
class _Image:
    row: int
    tiles: torch.Tensor
    boxes: list
    size: tuple[int, int]


class _Tiles(torch.utils.data.Dataset):
    def __init__(self, cub: CUB, rows: list[int], preprocess: Preprocess):
        self.cub, self.rows, self.preprocess = cub, rows, preprocess

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i) -> _Image:
        row = self.rows[i]
        image = load_rgb(self.cub.image_path(row))
        boxes = tile_boxes(*image.size)
        tiles = [self.preprocess.image(image.crop((x, y, x + s, y + s))) for x, y, s in boxes]
        return _Image(row, torch.stack(tiles), boxes, image.size)


def write_masks(data_root: str | Path, out: str | Path, score: Scorer, preprocess: Preprocess, *,
                config: dict, to_mask: Callable[[torch.Tensor], torch.Tensor] = lambda s: s > 0,
                splits=None, waterbirds_root=None, batch_size: int = 16, workers: int = 2,
                device: torch.device | str = "cpu", progress: bool = True) -> Path:
    """Run `score` over every image of `splits` and write `to_mask(score map)` as 0/255 PNGs.

    Images whose mask file exists are skipped: files are written atomically, so they are
    complete, and an interrupted run resumes where it stopped.
    """
    root, out = Path(data_root).expanduser(), Path(out).expanduser()
    cubs = [CUB(root, s, waterbirds_root=waterbirds_root)  # a bad dataset fails before any write
            for s in dataset_splits(root, splits, waterbirds_root)]
    claim_mask_folder(out, config)
    device = torch.device(device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else nullcontext())
    for cub in cubs:
        split = cub.split
        folder = out / WATERBIRDS_SUBDIR if split == "waterbirds" else out
        target = [folder / Path(p).with_suffix(".png") for p in cub.paths]
        rows = [i for i, path in enumerate(target) if not path.is_file()]
        bar = tqdm(total=len(rows), desc=f"masks {split}", unit="img", disable=not progress)
        for images in batches(_Tiles(cub, rows, preprocess), batch_size=batch_size,
                              workers=workers):
            tiles = torch.cat([im.tiles for im in images]).to(device)
            groups = [len(im.tiles) for im in images]
            with torch.no_grad(), autocast:
                scores = score(tiles, groups).float().cpu()
            for im, s in zip(images, scores.split(groups)):
                mask = to_mask(assemble(s, im.boxes, im.size)).numpy()
                with atomic(target[im.row]) as tmp:
                    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
            bar.update(len(images))
        bar.close()
    return out


def predict(data_root: str | Path, model: str | Path, out: str | Path, *, splits=None,
            waterbirds_root=None, batch_size: int = 16, workers: int = 2, device: str = "auto",
            progress: bool = True) -> Path:
    """Masks of a trained segmenter folder (from `train`) for every image of `splits`."""
    folder = Path(model).expanduser()
    seg = load(folder)
    device = runtime(device).device
    seg.to(device)
    weights = hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()[:16]
    config = dict(kind="segmenter", weights_sha256=weights,
                  spec={k: v for k, v in seg.spec.items() if k != "config"})
    return write_masks(data_root, out, lambda tiles, _: seg.scores(tiles), seg.preprocess,
                       config=config, splits=splits, waterbirds_root=waterbirds_root,
                       batch_size=batch_size, workers=workers, device=device, progress=progress)
