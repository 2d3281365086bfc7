"""Image and mask preprocessing: the image and its mask always go through the same geometry.

Evaluation: resize the shorter side to the model's input size (bicubic, antialiased), centre crop,
normalise. The mask is resized as a float image, so each output pixel holds the fraction of bird
it covers (area fractions on any coarser grid are then plain averages), and separately with
nearest-neighbour, the seed code's binary rule.
"""

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF


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
