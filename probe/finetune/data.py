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

import copy
import random

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from probe.data.cub import CUB
from probe.data.masks import early_mask
from probe.data.transforms import Preprocess
from probe.dump import _grid_fg

GEOMETRIC_OPS = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel",
                 "TranslateYRel"}


def keep_on_grid(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, S, S] binary mask in the input frame -> [B, h, w] 0/1 on a feature grid.

    The seed's rule, the one behind the dump's ``fgseed`` maps: nearest-exact resize.
    """
    return _grid_fg(mask.float(), grid, "seed")


class TrainTransform:
    """(image, mask or None) -> (normalised tensor [3, S, S], float mask [S, S] or None)."""

    def __init__(self, image_size: int, mean, std, rand_augment: str, random_erasing: float):
        primary, secondary, self.final = create_transform(
            image_size, is_training=True, auto_augment=rand_augment or None,
            interpolation="bicubic", re_prob=random_erasing, re_mode="pixel", mean=mean, std=std,
            separate=True)
        self.crop, flip = primary.transforms
        self.flip_p = flip.p
        self.colour = secondary.transforms  # RandAugment (or colour jitter when it is off)

    def __call__(self, image: Image.Image, mask: Image.Image | None = None):
        crop = self.crop
        i, j, h, w = crop.get_params(image, crop.scale, crop.ratio)
        interp = crop.interpolation
        interp = random.choice(interp) if isinstance(interp, (list, tuple)) else interp
        image = TF.resized_crop(image, i, j, h, w, crop.size, interp)
        if mask is not None:
            mask = TF.resized_crop(mask, i, j, h, w, crop.size, InterpolationMode.NEAREST)
        if torch.rand(1) < self.flip_p:  # the draw torchvision's RandomHorizontalFlip makes
            image = TF.hflip(image)
            mask = None if mask is None else TF.hflip(mask)
        for t in self.colour:
            if isinstance(t, RandAugment):
                image, mask = _rand_augment(t, image, mask)
            else:
                image = t(image)
        x = self.final(image)
        return x, None if mask is None else torch.from_numpy(np.asarray(mask) > 0).float()


def _rand_augment(ra: RandAugment, image: Image.Image, mask: Image.Image | None):
    """timm's RandAugment.__call__, replaying each geometric op's random draws on the mask."""
    ops = np.random.choice(ra.ops, ra.num_layers, replace=ra.choice_weights is None,
                           p=ra.choice_weights)
    for op in ops:
        before = random.getstate()
        image = op(image)
        if mask is not None and op.name in GEOMETRIC_OPS:
            after = random.getstate()
            random.setstate(before)  # same apply/magnitude/sign draws as the image's op
            mask_op = copy.copy(op)
            mask_op.kwargs = dict(op.kwargs, fillcolor=0, resample=Image.NEAREST)
            mask = mask_op(mask)
            random.setstate(after)
    return image, mask


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
