"""Training and evaluation items: images, labels and, where the model masks, the mask.

Training uses timm's ImageNet training transform (``create_transform``), with one change: the
random resized crop, the flip and RandAugment's geometric ops (rotate, shear, translate) move
the mask exactly like the image, so late masking hides the bird's actual background after
augmentation. Colour ops and random erasing touch the image only (erasing hides pixels but
does not move the bird). Every strategy goes through this same code, so baseline, early and
late runs see identically distributed augmentations.

Evaluation uses the dump's preprocessing (`probe.data.transforms.Preprocess`) and the seed's
mask rule, so fine-tuned and frozen runs are scored on the same inputs and masks.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from probe.data.cub import CUB
from probe.data.masks import early_mask
from probe.data.transforms import Preprocess, TrainTransform, mask_to_grid


def keep_on_grid(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, S, S] binary mask in the input frame -> [B, h, w] 0/1 on a feature grid.

    The seed's rule, the one behind the dump's ``fgseed`` maps: nearest-exact resize.
    """
    return mask_to_grid(mask, grid, "seed")


class TrainItems(torch.utils.data.Dataset):
    """Augmented training images; early masking blacks out the background before any transform."""

    def __init__(self, cub: CUB, transform: TrainTransform, early: bool, with_mask: bool):
        self.cub, self.transform, self.early, self.with_mask = cub, transform, early, with_mask

    def __len__(self) -> int:
        return len(self.cub)

    def __getitem__(self, i: int) -> dict:
        s = self.cub[i]
        image = early_mask(s.image, s.mask) if self.early else s.image
        mask = Image.fromarray(s.mask.astype(np.uint8) * 255) if self.with_mask else None
        x, m = self.transform(image, mask)
        item = {"image": x, "label": s.label, "id": s.image_id}
        if m is not None:
            item["mask"] = m
        return item


class EvalItems(torch.utils.data.Dataset):
    """One evaluation set: a split on original or early-masked input, preprocessed like the dump."""

    def __init__(self, cub: CUB, preprocess: Preprocess, masked_input: bool, with_mask: bool):
        self.cub, self.preprocess = cub, preprocess
        self.masked_input, self.with_mask = masked_input, with_mask

    def __len__(self) -> int:
        return len(self.cub)

    def __getitem__(self, i: int) -> dict:
        s = self.cub[i]
        image = early_mask(s.image, s.mask) if self.masked_input else s.image
        item = {"image": self.preprocess.image(image), "label": s.label, "id": s.image_id}
        if self.with_mask:
            item["mask"] = self.preprocess.mask(s.mask)[1]  # the nearest-resized binary mask
        return item
