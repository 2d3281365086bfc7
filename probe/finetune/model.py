"""A backbone and the study's linear head, with late masking inside the forward pass.

Built from the pieces of `probe.backbones.Backbone` that `forward_taps` uses (trunk up to L-1,
masking of the L-1 state with prefix tokens kept, last stage, channels-last map), so the
fine-tuned model computes exactly what the dump stores, but with gradients and without running
the last stage twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from probe.backbones import MASKED, Backbone
from probe.errors import ProbeError

HEADS = ("cls", "patch", "cls+patch")


class MaskedClassifier(torch.nn.Module):
    """``y = fc(pool(map))`` with ``late`` = None, "L" (map ⊙ m) or "L-1" (mask, then last stage).

    pool = mean over ALL cells (zeros included) of the last map; ConvNeXt: then the backbone's
    own head LayerNorm; ViT: CLS token, that mean, or both concatenated (CLS never masked).
    """

    def __init__(self, backbone: Backbone, num_classes: int, head: str = "patch",
                 late: str | None = None):
        super().__init__()
        if head not in HEADS:
            raise ProbeError(f"head must be one of {HEADS}, got {head!r}")
        if head != "patch" and not backbone.num_prefix_tokens:
            raise ProbeError(f"{backbone.name} has no CLS token; use --head patch (GAP, the "
                             "study's ConvNeXt head)")
        if late == "L-1" and MASKED not in backbone.taps:
            raise ProbeError(f"{backbone.name} ({backbone.kind}) cannot mask after stage L-1; "
                             "use --stage L, or a timm ViT / ConvNeXt")
        if late not in (None, "L", "L-1"):
            raise ProbeError(f"late masking stage must be L or L-1, got {late!r}")
        self.backbone, self.head, self.late = backbone, head, late
        dim = backbone.dim("L") * (2 if head == "cls+patch" else 1)
        self.fc = torch.nn.Linear(dim, num_classes)
        torch.nn.init.trunc_normal_(self.fc.weight, std=0.02)  # timm's init for new heads
        torch.nn.init.zeros_(self.fc.bias)

    @property
    def mask_grid(self) -> tuple[int, int] | None:
        """The feature grid the mask is resized to (None: the model does not mask)."""
        return self.backbone.grid(self.late) if self.late else None

    def _head_norm(self):
        # Not a submodule of ours: registering it twice would duplicate its weights on disk.
        norm = getattr(getattr(self.backbone.model, "head", None), "norm", None)
        has_weight = getattr(norm, "weight", None) is not None  # head_norm_first: an Identity
        return norm if self.backbone.kind == "convnext" and has_weight else None

    def features(self, x: torch.Tensor, keep: torch.Tensor | None = None):
        """The last map [B, h, w, D] (masked at L-1 if so configured) and prefix tokens."""
        bb = self.backbone
        state = bb.trunk(x)
        if self.late == "L-1":
            state = bb.mask_state(state, keep)
        return bb.to_map(bb.last_stage(state))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of a normalised batch; ``keep`` [B, *mask_grid] is 1 on foreground cells."""
        if self.late and (keep is None or tuple(keep.shape) != (x.shape[0], *self.mask_grid)):
            got = None if keep is None else tuple(keep.shape)
            raise ProbeError(f"late masking at {self.late} needs keep of shape "
                             f"{(x.shape[0], *self.mask_grid)}, got {got}")
        fmap, prefix = self.features(x, keep)
        if self.late == "L":
            # A product, so the background cells' gradients are zeroed as well.
            fmap = fmap * keep[..., None].to(fmap.dtype)
        pooled = fmap.mean(dim=(1, 2))
        if (norm := self._head_norm()) is not None:
            pooled = F.layer_norm(pooled, pooled.shape[-1:], norm.weight, norm.bias, norm.eps)
        parts = {"cls": None if prefix is None else prefix[:, 0], "patch": pooled}
        return self.fc(torch.cat([parts[name] for name in self.head.split("+")], dim=1))
