"""Image and mask preprocessing: the image and its mask always go through the same geometry.

Evaluation: resize the shorter side to the model's input size (bicubic, antialiased), centre crop,
normalise. The mask is resized as a float image, so each output pixel holds the fraction of bird
it covers (area fractions on any coarser grid are then plain averages), and separately with
nearest-neighbour, the seed code's binary rule.

Augmented views (the study's frozen-recipe training transform): random resized crop, flip,
RandAugment(9, 0.5) and random erasing 0.25. Every geometric step moves the mask too, so its
foreground map stays right; colour steps and erasing touch the image only.
"""

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

GEOMETRIC_OPS = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}


@dataclass(frozen=True)
class Preprocess:
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def describe(self) -> str:
        return (f"Resize(shorter side {self.image_size}, bicubic, antialias) + "
                f"CenterCrop({self.image_size}) + Normalize(mean={list(self.mean)}, std={list(self.std)})")

    def _geometry(self, x: torch.Tensor, interpolation: InterpolationMode) -> torch.Tensor:
        antialias = interpolation != InterpolationMode.NEAREST
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
        nearest = self._geometry(m, InterpolationMode.NEAREST)[0]
        return area, nearest

    def augmented(self, image: Image.Image, mask: np.ndarray | None,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One augmented view, fully determined by `seed`: (image, area mask, nearest mask).

        The global RNG is forked, so views do not depend on the worker, rank or resume point.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            x = TF.pil_to_tensor(image)
            masks = [] if mask is None else [torch.from_numpy(np.ascontiguousarray(mask))[None].float()] * 2
            modes = (InterpolationMode.BILINEAR, InterpolationMode.NEAREST)
            top, left, h, w = RandomResizedCrop.get_params(x, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
            size = [self.image_size, self.image_size]
            x = TF.resized_crop(x, top, left, h, w, size, InterpolationMode.BICUBIC, antialias=True)
            masks = [TF.resized_crop(m, top, left, h, w, size, mode, antialias=mode != modes[1])
                     for m, mode in zip(masks, modes)]
            if torch.rand(()) < 0.5:
                x, masks = TF.horizontal_flip(x), [TF.horizontal_flip(m) for m in masks]
            x, masks = _rand_augment(x, masks, modes)
            x = TF.normalize(x.float() / 255.0, self.mean, self.std)
            x = v2.RandomErasing(p=0.25, value="random")(x)
        area, nearest = (None, None) if not masks else (masks[0].clamp(0, 1)[0], masks[1][0])
        return x, area, nearest


_RAND_AUGMENT = v2.RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=11,
                               interpolation=InterpolationMode.BILINEAR)  # tensors: no bicubic


def _rand_augment(x, masks, modes, magnitude: float = 9.0, std: float = 0.5):
    """timm's rand-m9-mstd0.5 on torchvision's op set: 2 ops, magnitude ~ N(9, 0.5) out of 10.

    torchvision's RandAugment does not accept masks, so its ops are drawn and applied here,
    geometric ones to the masks as well (torchvision internals, pinned by the version range).
    """
    space = _RAND_AUGMENT._AUGMENTATION_SPACE
    h, w = x.shape[-2:]
    for _ in range(2):
        op, (magnitudes_fn, signed) = _RAND_AUGMENT._get_random_item(space)
        levels = magnitudes_fn(11, h, w)
        value = 0.0
        if levels is not None and levels.ndim > 0:  # interpolate between the 0..10 levels at a noisy magnitude
            m = float(np.clip(magnitude + std * torch.randn(()).item(), 0, 10))
            lo, hi = int(np.floor(m)), int(np.ceil(m))
            value = float(levels[lo] + (m - lo) * (levels[hi] - levels[lo]))
            value = round(value) if levels.dtype == torch.int32 else value
            if signed and torch.rand(()) <= 0.5:
                value = -value
        x = _RAND_AUGMENT._apply_image_or_video_transform(
            x, op, value, interpolation=InterpolationMode.BILINEAR, fill=_RAND_AUGMENT._fill)
        if op in GEOMETRIC_OPS:
            masks = [_RAND_AUGMENT._apply_image_or_video_transform(
                m, op, value, interpolation=mode, fill=_RAND_AUGMENT._fill)
                for m, mode in zip(masks, modes)]
    return x, masks
