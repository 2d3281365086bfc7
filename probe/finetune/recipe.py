"""The study's training recipes as data: Table 2 (fine-tune) and Table 1 (frozen, on-line).

Every value can be overridden. A run whose values differ from its named recipe is labelled
with the differences (e.g. ``paper(epochs=30)``), so the report never shows it as a study cell.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from probe.errors import ProbeError
from probe.experiments import default_kind_of
from probe.heads import FROZEN_RECIPES

# Stochastic depth by model size (Table 2); every ViT and any other model: 0.1.
DROP_PATH = {"convnext_s": 0.1, "convnext_b": 0.2, "convnext_l": 0.3,  # study, Table 2
             "convnext_small": 0.1, "convnext_base": 0.2, "convnext_large": 0.3}  # timm names
RECIPES = ("paper", "frozen")


@dataclass(frozen=True)
class Recipe:
    name: str
    epochs: int
    batch_size: int  # global: images per optimiser step, over all ranks and accumulation
    lr: float  # the new linear head's learning rate
    backbone_lr: float  # every pretrained parameter (incl. a ConvNeXt's head norm)
    weight_decay: float  # never on norms, biases, position embeddings and prefix tokens
    warmup_epochs: int  # linear warm-up from 0, then cosine to min_lr (timm CosineLRScheduler)
    min_lr: float
    label_smoothing: float
    mixup: float  # Mixup alpha (0 = off)
    cutmix: float  # CutMix alpha (0 = off); with both on, timm switches per batch with p=0.5
    rand_augment: str  # timm RandAugment config ("" = off)
    random_erasing: float  # probability, timm RandomErasing in "pixel" mode
    drop_path: float
    freeze_backbone: bool

    def label(self, backbone: str) -> str:
        """The name, plus every value that differs from the named recipe's for ``backbone``."""
        base = asdict(make_recipe(self.name, backbone))
        diff = {k: v for k, v in asdict(self).items() if base[k] != v}
        return self.name + (f"({','.join(f'{k}={v}' for k, v in sorted(diff.items()))})"
                            if diff else "")


def make_recipe(name: str, backbone: str, **overrides) -> Recipe:
    """The named recipe for ``backbone`` (registry or timm name), with ``overrides`` applied."""
    family = default_kind_of(backbone)
    if name == "paper":
        recipe = Recipe(name, epochs=300, batch_size=64, lr=4e-3, backbone_lr=4e-6,
                        weight_decay=5e-2, warmup_epochs=20, min_lr=0.0, label_smoothing=0.1,
                        mixup=0.8, cutmix=1.0, rand_augment="rand-m9-mstd0.5",
                        random_erasing=0.25, drop_path=DROP_PATH.get(backbone.split(".")[0], 0.1),
                        freeze_backbone=False)
    elif name == "frozen":  # the head alone on a frozen backbone; no mixing, no stochastic depth
        frozen = FROZEN_RECIPES[family]
        recipe = Recipe(name, epochs=90, batch_size=128, lr=frozen["lr"], backbone_lr=0.0,
                        weight_decay=frozen["weight_decay"], warmup_epochs=0, min_lr=0.0,
                        label_smoothing=0.1, mixup=0.0, cutmix=0.0,
                        rand_augment="rand-m9-mstd0.5", random_erasing=0.25, drop_path=0.0,
                        freeze_backbone=True)
    else:
        raise ProbeError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    known = {f.name for f in fields(Recipe)} - {"name"}
    unknown = set(overrides) - known
    if unknown:
        raise ProbeError(f"unknown recipe value(s) {sorted(unknown)}; known: {sorted(known)}")
    r = replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    if r.epochs < 1 or r.batch_size < 1:
        raise ProbeError(f"epochs and batch size must be >= 1, got {r.epochs} and {r.batch_size}")
    if not 0 <= r.warmup_epochs < r.epochs:
        raise ProbeError(f"{r.warmup_epochs} warm-up epochs do not fit in {r.epochs} epochs; pass "
                         f"--warmup-epochs between 0 and {r.epochs - 1}")
    if r.rand_augment and not r.rand_augment.startswith("rand"):  # see probe.finetune.data
        raise ProbeError(f"--rand-augment {r.rand_augment!r}: only timm RandAugment configs "
                         "('rand-...') move the mask with the image; use '' to switch it off")
    return r
