import numpy as np
import torch
from PIL import Image

import probe.data.transforms as transforms
from probe.data.transforms import GEOMETRIC_OPS, Preprocess


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


def test_augmented_views_move_the_mask_with_the_image(monkeypatch):
    """With only geometric RandAugment ops, the augmented image of a white-on-black mask is
    the augmented mask, except where random erasing painted noise."""
    space = {k: v for k, v in transforms._RAND_AUGMENT._AUGMENTATION_SPACE.items()
             if k in GEOMETRIC_OPS}
    monkeypatch.setattr(transforms._RAND_AUGMENT, "_AUGMENTATION_SPACE", space)
    mask = np.zeros((90, 110), bool)
    mask[20:70, 15:60] = True
    mask[30:40, 60:100] = True  # asymmetric, so a missed flip or shear shows
    image = Image.fromarray(np.where(mask[..., None], 255, 0).astype(np.uint8).repeat(3, 2))
    pre = Preprocess(64, (0.0,) * 3, (1.0,) * 3)
    mismatch = []
    for seed in range(24):
        x, area, nearest = pre.augmented(image, mask, seed)
        mismatch.append(float(((x.mean(0) - area).abs() > 0.5).float().mean()))
        assert ((nearest > 0.5) == (area > 0.5)).float().mean() > 0.95
    assert np.median(mismatch) < 0.02 and max(mismatch) < 0.4, mismatch
    first = pre.augmented(image, mask, 5)
    assert all(torch.equal(a, b) for a, b in zip(first, pre.augmented(image, mask, 5)))
