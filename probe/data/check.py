"""`probe data check`: validate a dataset root and list every problem instead of stopping."""

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from probe.data.cub import WATERBIRDS_DIRNAME, CUBIndex, read_waterbirds_metadata
from probe.data.images import load_binary_mask, load_rgb
from probe.data.masks import MaskSource
from probe.errors import DataError


@dataclass
class CheckReport:
    root: Path
    counts: dict[str, int] = field(default_factory=dict)
    classes: int = 0
    min_per_class: int = 0
    size_range: tuple[tuple[int, int], tuple[int, int]] | None = None
    mask_coverage: dict[str, float] = field(default_factory=dict)  # fraction of images with a mask
    foreground_fraction: float | None = None  # mean bird area over images with a mask
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        out = [f"dataset {self.root}"]
        out += [f"  {split:<11} {n:>6} images" for split, n in self.counts.items()]
        out.append(f"  classes     {self.classes:>6} (fewest train images in a class: "
                   f"{self.min_per_class})")
        if self.size_range:
            (w0, h0), (w1, h1) = self.size_range
            out.append(f"  image sizes {w0}x{h0} .. {w1}x{h1} (smallest and largest area)")
        for source, cover in self.mask_coverage.items():
            out.append(f"  masks {source}: {100 * cover:.1f}% of images")
        if self.foreground_fraction is not None:
            out.append(f"  mean foreground area {100 * self.foreground_fraction:.1f}%")
        out.append("  OK: no problems found" if self.ok else f"  {len(self.problems)} problem(s):")
        out += [f"    - {p}" for p in self.problems]
        return out


def check_dataset(root: str | Path, waterbirds_root: str | Path | None = None,
                  masks: str = "gt", decode: bool = True, progress: bool = True) -> CheckReport:
    """Read every index file, image and mask of a CUB-layout root and report what is wrong."""
    index = CUBIndex.load(root, collect_problems=True)
    report = CheckReport(index.root, problems=list(index.problems))
    train = index.labels[index.is_train]
    report.counts = {"train": int(index.is_train.sum()), "test": int((~index.is_train).sum())}
    report.classes = len(index.class_names)
    per_class = Counter(train.tolist())
    report.min_per_class = min((per_class.get(c, 0) for c in range(report.classes)), default=0)
    for c in range(report.classes):
        if per_class.get(c, 0) == 0:
            report.problems.append(f"class {index.class_names[c]} has no training image")

    source = MaskSource.parse(masks)
    if source.kind == "dir" and not source.folder.is_dir():
        report.problems.append(f"mask folder {source.folder} does not exist")
    wb_root = Path(waterbirds_root or index.root / WATERBIRDS_DIRNAME)
    items = [(index.root / "images" / p, p, False) for p in index.paths]
    if wb_root.is_dir() or waterbirds_root is not None:
        test_paths = [p for p, tr in zip(index.paths, index.is_train) if not tr]
        try:
            meta = read_waterbirds_metadata(wb_root)
            report.problems += [f"{wb_root / 'metadata.csv'}: no row for test image {p}"
                                for p in test_paths if p not in meta]
        except DataError as err:
            report.problems.append(str(err))
        report.counts["waterbirds"] = len(test_paths)
        items += [(wb_root / p, p, True) for p in test_paths]

    sizes, fg, with_mask = [], [], Counter()
    for path, rel, is_wb in tqdm(items, desc="checking", unit="img", disable=not progress):
        if not path.is_file():
            report.problems.append(f"missing image {path}")
            continue
        try:
            size = load_rgb(path).size if decode else None
            if size:
                sizes.append(size)
            if source.kind != "none" and source.path(index.root, rel, is_wb).is_file():
                mask = load_binary_mask(source.path(index.root, rel, is_wb), size)
                with_mask["waterbirds" if is_wb else "cub"] += 1
                fg.append(mask.mean())
        except DataError as err:
            report.problems.append(str(err))
    if sizes:
        areas = [w * h for w, h in sizes]
        report.size_range = (sizes[int(np.argmin(areas))], sizes[int(np.argmax(areas))])
    for split, count in (("cub", len(index.paths)), ("waterbirds", report.counts.get("waterbirds", 0))):
        if 0 < with_mask[split] < count:  # none at all just means no masks were installed
            report.problems.append(f"{count - with_mask[split]} of {count} {split} images have "
                                   f"no mask in source {source.spec!r}")
    if source.kind != "none":
        report.mask_coverage[f"{source.spec} (CUB)"] = with_mask["cub"] / max(len(index.paths), 1)
        if "waterbirds" in report.counts:
            report.mask_coverage[f"{source.spec} (Waterbirds)"] = (
                with_mask["waterbirds"] / max(report.counts["waterbirds"], 1))
        report.foreground_fraction = float(np.mean(fg)) if fg else None
    return report
