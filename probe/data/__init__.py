"""Datasets: CUB-200-2011, its Waterbirds copy, mask sources and the synthetic benchmark."""

from probe.data.cub import CUB, Sample
from probe.data.masks import MaskSource, early_mask

__all__ = ["CUB", "MaskSource", "Sample", "early_mask"]
