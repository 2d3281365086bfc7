"""Foreground-background mask sources and early masking.

A mask source is named on the command line as `gt` (CUB's own segmentations), `dir:PATH` (a
folder of predicted PNG masks mirroring `images/`) or `none`. A predicted-mask folder may hold a
`waterbirds/` subfolder with masks predicted on the Waterbirds copy; without it the CUB mask of the
same image is used, which is valid because Waterbirds pastes each bird at its original place.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from probe.data.images import load_binary_mask
from probe.errors import DataError

WATERBIRDS_SUBDIR = "waterbirds"


@dataclass(frozen=True)
class MaskSource:
    kind: str  # "gt" | "dir" | "none"
    folder: Path | None = None

    @classmethod
    def parse(cls, spec: "str | MaskSource | None") -> "MaskSource":
        if isinstance(spec, MaskSource):
            return spec
        if spec is None or spec == "none":
            return cls("none")
        if spec == "gt":
            return cls("gt")
        if spec.startswith("dir:") and len(spec) > 4:
            return cls("dir", Path(spec[4:]).expanduser())
        raise DataError(f"unknown mask source {spec!r}; use 'gt', 'dir:PATH' or 'none'")

    @property
    def name(self) -> str:
        """Short name used in store array names (letters, digits, '-', '_', '.')."""
        if self.kind != "dir":
            return self.kind
        name = "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "-"
                       for c in self.folder.resolve().name)
        return name.strip(".-_") or "masks"

    @property
    def spec(self) -> str:
        """Canonical spelling (absolute folder), so relative and absolute paths compare equal."""
        return f"dir:{self.folder.resolve()}" if self.kind == "dir" else self.kind

    def path(self, cub_root: Path, rel_path: str, waterbirds: bool = False) -> Path:
        """Where the mask of image `rel_path` (relative to `images/`) lives."""
        stem = str(Path(rel_path).with_suffix(".png"))
        if self.kind == "gt":
            return Path(cub_root) / "segmentations" / stem
        if self.kind == "dir":
            if waterbirds and (self.folder / WATERBIRDS_SUBDIR).is_dir():
                return self.folder / WATERBIRDS_SUBDIR / stem
            return self.folder / stem
        raise DataError("mask source 'none' has no masks; pass --masks gt or --masks dir:PATH")

    def load(self, cub_root: Path, rel_path: str, size: tuple[int, int] | None = None,
             waterbirds: bool = False) -> np.ndarray:
        """Bool [H, W] mask, checked against the image size (W, H) when given."""
        path = self.path(cub_root, rel_path, waterbirds)
        if not path.is_file():
            raise DataError(f"mask not found: {path} (mask source {self.spec!r})")
        return load_binary_mask(path, size)

    def missing(self, cub_root: Path, rel_paths: list[str], waterbirds: bool = False) -> list[Path]:
        """Mask files that do not exist, so a run can list them all before starting."""
        paths = (self.path(cub_root, rel, waterbirds) for rel in rel_paths)
        return [p for p in paths if not p.is_file()]


def mask_name(source: "str | MaskSource") -> str:
    """Short name of a mask source given as `gt`, `dir:PATH`, a MaskSource, or already a name."""
    if isinstance(source, MaskSource) or source in ("gt", "none") or source.startswith("dir:"):
        return MaskSource.parse(source).name
    return source


def early_mask(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """Black out the background at the image's original resolution, before any transform.

    This is exactly the picture a user would get by saving the masked image and loading it back.
    """
    if mask.shape != (image.height, image.width):
        raise DataError(
            f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {image.width}x{image.height}"
        )
    pixels = np.asarray(image.convert("RGB")).copy()
    pixels[~mask] = 0
    return Image.fromarray(pixels)
