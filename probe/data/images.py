"""Decoding image and mask files into the forms the rest of probe expects."""

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from probe.errors import DataError


def _open(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(
            f"cannot decode image {path} ({err}); re-download the file or remove its line "
            "from images.txt"
        ) from None
    return image


def load_rgb(path: Path) -> Image.Image:
    """An RGB image whatever the file's mode (grayscale, palette, RGBA and CMYK all occur in CUB)."""
    image = _open(path)
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")  # palette transparency survives only through RGBA
    return image.convert("RGB")


def load_binary_mask(path: Path, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """A bool [H, W] foreground mask; any value > 0 is foreground, as in the study's code."""
    mask = np.asarray(_open(path).convert("L")) > 0
    if expected_size is not None and (mask.shape[1], mask.shape[0]) != tuple(expected_size):
        raise DataError(
            f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but its image is "
            f"{expected_size[0]}x{expected_size[1]}; masks must have the image's size"
        )
    return mask
