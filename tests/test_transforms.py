import numpy as np
import torch
from PIL import Image

from probe.data.transforms import Preprocess, mask_to_grid


def test_eval_transform_keeps_mask_and_image_aligned():
    mask = np.zeros((80, 120), bool)
    mask[10:50, 70:110] = True
    image = Image.fromarray(np.where(mask[..., None], 255, 0).astype(np.uint8).repeat(3, 2))
    pre = Preprocess(64, (0.0,) * 3, (1.0,) * 3)
    gray = pre.image(image).mean(0)
    area, nearest = pre.mask(mask)
    assert (gray - area).abs().mean() < 0.02  # bicubic vs bilinear differ only at edges
    assert ((gray > 0.5) == (area > 0.5)).float().mean() > 0.98
    assert set(nearest.unique().tolist()) <= {0.0, 1.0} and (nearest - area).abs().mean() < 0.05


def test_mask_to_grid_rules():
    mask = torch.zeros(1, 8, 8)
    mask[0, :3, :5] = 1
    area = mask_to_grid(mask, (2, 2), "area")
    assert torch.allclose(area, torch.tensor([[[12 / 16, 3 / 16], [0.0, 0.0]]]))
    seed = mask_to_grid(mask, (2, 2), "seed")  # nearest-exact samples pixel (2, 2) of each cell
    assert seed.tolist() == [[[1.0, 0.0], [0.0, 0.0]]]


def test_area_fractions_match_the_full_resolution_mask():
    """Independent of the resize code: 128 px -> 64 px input -> 4x4 grid is exact 32x32 blocks
    of the original mask."""
    rng = np.random.default_rng(0)
    mask = np.zeros((128, 128), bool)
    for _ in range(6):
        y, x, r = rng.integers(10, 118), rng.integers(10, 118), rng.integers(5, 30)
        yy, xx = np.ogrid[:128, :128]
        mask |= (yy - y) ** 2 + (xx - x) ** 2 < r ** 2
    area, _ = Preprocess(64, (0.0,) * 3, (1.0,) * 3).mask(mask)
    exact = mask.reshape(4, 32, 4, 32).mean(axis=(1, 3))
    np.testing.assert_allclose(mask_to_grid(area[None], (4, 4), "area")[0].numpy(), exact, atol=0.02)
