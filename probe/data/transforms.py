"""Image and mask preprocessing: the image and its mask always go through the same geometry.

Evaluation: resize the shorter side to the model's input size (bicubic, antialiased), centre crop,
normalise. The mask is resized as a float image, so each output pixel holds the fraction of bird
it covers (area fractions on any coarser grid are then plain averages), and separately with
nearest-neighbour, the seed code's binary rule.

Training (augmented views and fine-tuning): timm's ImageNet training transform
(`create_transform`: random resized crop, flip, RandAugment, random erasing) with one change:
the crop, the flip and RandAugment's geometric ops (rotate, shear, translate) move the mask
exactly like the image. Colour ops and random erasing touch the image only.
"""

import copy
import random
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF1
from torchvision.transforms.v2 import functional as TF

GEOMETRIC_OPS = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel",
                 "TranslateYRel"}
STUDY_RAND_AUGMENT = "rand-m9-mstd0.5"  # RandAugment(9, 0.5) of the study's Tables 1 and 2


@dataclass(frozen=True)
class Preprocess:
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def describe(self) -> str:
        return (f"Resize(shorter side {self.image_size}, bicubic, antialias) + "
                f"CenterCrop({self.image_size}) + Normalize(mean={list(self.mean)}, std={list(self.std)})")

    def _geometry(self, x: torch.Tensor, interpolation: InterpolationMode) -> torch.Tensor:
        antialias = interpolation == InterpolationMode.BILINEAR or interpolation == InterpolationMode.BICUBIC
        x = TF.resize(x, self.image_size, interpolation=interpolation, antialias=antialias)
        return TF.center_crop(x, self.image_size)

    def image(self, image: Image.Image) -> torch.Tensor:
        """Normalised float image [3, S, S]."""
        x = self._geometry(TF.pil_to_tensor(image), InterpolationMode.BICUBIC)
        return TF.normalize(x.float() / 255.0, self.mean, self.std)

    def mask(self, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The bool [H, W] mask in the image's output frame: (area fraction, nearest binary), [S, S]."""
        m = torch.from_numpy(np.ascontiguousarray(mask))[None].float()
        area = self._geometry(m, InterpolationMode.BILINEAR).clamp_(0, 1)[0]
        nearest = self._geometry(m, InterpolationMode.NEAREST_EXACT)[0]
        return area, nearest



def mask_to_grid(mask: torch.Tensor, grid: tuple[int, int], rule: str) -> torch.Tensor:
    """[B, S, S] mask in the image frame -> [B, h, w] on a feature grid.

    "area": mean of the area fractions = fraction of each cell covered by bird;
    "seed": the study's code, a nearest-exact resize of the binary mask.
    """
    if rule == "area":
        return F.adaptive_avg_pool2d(mask[:, None].float(), grid)[:, 0]
    return F.interpolate(mask[:, None].float(), size=grid, mode="nearest-exact")[:, 0]


@contextmanager
def seeded(seed: int):
    """Run with Python, numpy and torch RNGs seeded, restoring the caller's states after."""
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


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
        image = TF1.resized_crop(image, i, j, h, w, crop.size, interp)
        if mask is not None:
            mask = TF1.resized_crop(mask, i, j, h, w, crop.size, InterpolationMode.NEAREST)
        if torch.rand(1) < self.flip_p:  # the draw torchvision's RandomHorizontalFlip makes
            image = TF1.hflip(image)
            mask = None if mask is None else TF1.hflip(mask)
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
