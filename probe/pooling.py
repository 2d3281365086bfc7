"""Pooling of stored spatial features into one vector per image (pure functions, no I/O).

A tap map ``x`` is [N, h, w, D] (float16 in the store), ``prefix`` is [N, P, D] (CLS first)
and a foreground map ``fg`` is [N, h, w]. Every function is row-independent, so a caller can
stream a store chunk by chunk and concatenate the results. numpy in gives numpy out; torch in
gives torch out (on the input's device).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from probe.errors import ProbeError
from probe.store import fg_array_name, prefix_array_name

REPRESENTATIONS = ("cls", "patch", "cls+patch")
SPATIAL = ("mean", "late", "fgmean", "bg")
FG_RULES = ("seed", "area")

Array = np.ndarray | torch.Tensor


class PoolingError(ProbeError, ValueError):
    """Bad pooling arguments; a ValueError too, so library callers can catch it the usual way."""


def keep_cells(fg: Array, threshold: float = 0.5) -> Array:
    """Boolean [N, h, w]: a cell is foreground when ``fg >= threshold``.

    ``fg`` is either the area fraction in [0, 1] or the seed's binary (0/1) map; with the
    binary map every threshold in (0, 1] gives the same cells.
    """
    _check_threshold(threshold)
    if fg.ndim != 3:
        raise PoolingError(f"foreground map must be [N, h, w], got shape {tuple(fg.shape)}")
    return fg >= threshold


def pool(
    x: Array,
    *,
    representation: str = "patch",
    spatial: str = "mean",
    prefix: Array | None = None,
    keep: Array | None = None,
    head_norm: dict | None = None,
) -> Array:
    """Pool a tap map into float32 [N, D] ("cls", "patch") or [N, 2D] ("cls+patch": CLS first).

    spatial (the patch part only; the CLS token is never masked):
      mean    mean over all h*w cells
      late    background cells zeroed, still divided by all h*w cells (the study's late masking)
      fgmean  mean over foreground cells only (zero vector when there are none)
      bg      foreground cells zeroed instead, divided by all cells (what the background predicts)
    ``keep`` [N, h, w] bool (see `keep_cells`) is required by the masked variants and refused by
    "mean". ``head_norm`` = dict(weight, bias, eps) applies the backbone's head LayerNorm to the
    pooled patch vector (ConvNeXt: GAP -> norm -> linear); only valid with "patch".
    """
    _check_names(representation, spatial)
    if head_norm is not None and representation != "patch":
        raise PoolingError(
            f"head_norm is the ConvNeXt head LayerNorm on the pooled patch vector; it needs "
            f"representation='patch', got {representation!r}"
        )
    as_numpy = isinstance(x, np.ndarray)
    xt = _tensor(x, "tap map")
    if xt.ndim != 4:
        raise PoolingError(f"tap map must be [N, h, w, D], got shape {tuple(xt.shape)}")
    n, h, w, d = xt.shape

    parts = []
    if representation in ("cls", "cls+patch"):
        parts.append(_cls(prefix, n, d, xt.device))
    if representation in ("patch", "cls+patch"):
        patch = _patch(xt, spatial, keep)
        if head_norm is not None:
            patch = _layer_norm(patch, head_norm)
        parts.append(patch)
    out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return out.cpu().numpy() if as_numpy else out


def _check_names(representation: str, spatial: str) -> None:
    if representation not in REPRESENTATIONS:
        raise PoolingError(
            f"representation must be one of {REPRESENTATIONS}, got {representation!r}"
        )
    if spatial not in SPATIAL:
        raise PoolingError(f"spatial pooling must be one of {SPATIAL}, got {spatial!r}")


def _check_threshold(threshold: float) -> None:
    if not 0.0 < threshold <= 1.0:
        raise PoolingError(f"foreground threshold must be in (0, 1], got {threshold}")


def _tensor(a: Array, what: str) -> torch.Tensor:
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(a))
    if isinstance(a, torch.Tensor):
        return a
    raise PoolingError(f"{what} must be a numpy array or a torch tensor, got {type(a).__name__}")


def _cls(prefix: Array | None, n: int, d: int, device: torch.device) -> torch.Tensor:
    if prefix is None:
        raise PoolingError(
            "representation 'cls' / 'cls+patch' needs the prefix tokens [N, P, D]; this store has "
            "none (a model without a CLS token): use representation='patch'"
        )
    p = _tensor(prefix, "prefix")
    if p.ndim != 3 or p.shape[0] != n or p.shape[1] < 1 or p.shape[2] != d:
        raise PoolingError(f"prefix must be [N={n}, P>=1, D={d}], got shape {tuple(p.shape)}")
    return p[:, 0].to(device=device, dtype=torch.float32)


def _patch(x: torch.Tensor, spatial: str, keep: Array | None) -> torch.Tensor:
    n, h, w, _ = x.shape
    if spatial == "mean":
        if keep is not None:
            raise PoolingError("spatial='mean' uses no mask; pass keep=None or choose 'late'")
        # Summing float16 with a float32 accumulator avoids both overflow and a full copy.
        return x.sum(dim=(1, 2), dtype=torch.float32) / (h * w)
    if keep is None:
        raise PoolingError(f"spatial={spatial!r} needs keep [N, h, w] (see keep_cells)")
    k = _tensor(keep, "keep").to(x.device)
    if tuple(k.shape) != (n, h, w):
        raise PoolingError(
            f"keep must be [N, h, w] = {(n, h, w)} like the tap map, got {tuple(k.shape)}"
        )
    k = k.bool()
    if spatial == "bg":
        k = ~k
    # Multiplying by 0/1 is exact in float16, so only the sum needs float32.
    total = (x * k.unsqueeze(-1).to(x.dtype)).sum(dim=(1, 2), dtype=torch.float32)
    if spatial == "fgmean":
        count = k.sum(dim=(1, 2)).to(torch.float32).clamp(min=1.0)  # no foreground -> 0 vector
        return total / count.unsqueeze(1)
    return total / (h * w)  # late / bg: background (resp. foreground) zeros still count


def _layer_norm(v: torch.Tensor, head_norm: dict) -> torch.Tensor:
    d = v.shape[1]
    try:
        weight = torch.as_tensor(head_norm["weight"], dtype=torch.float32, device=v.device)
        bias = torch.as_tensor(head_norm["bias"], dtype=torch.float32, device=v.device)
        eps = float(head_norm["eps"])
    except KeyError as e:
        raise PoolingError(f"head_norm must be dict(weight, bias, eps); missing {e}") from None
    if weight.shape != (d,) or bias.shape != (d,):
        raise PoolingError(
            f"head_norm weight/bias must have shape ({d},) like the pooled vector, got "
            f"{tuple(weight.shape)} / {tuple(bias.shape)}"
        )
    return torch.nn.functional.layer_norm(v, (d,), weight, bias, eps)


_SAFE = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True)
class PoolSpec:
    """Everything that determines a pooled array; `key()` names its cache entry.

    ``mask`` is the mask source name (e.g. "gt"); it is required by the masked spatial variants
    and must be None for "mean". ``fg_rule`` "seed" uses the seed's nearest-exact binary map,
    "area" the area fraction thresholded at ``threshold``.
    """

    tap: str = "L"
    representation: str = "cls+patch"
    spatial: str = "mean"
    mask: str | None = None
    fg_rule: str = "seed"
    threshold: float = 0.5

    def __post_init__(self) -> None:
        _check_names(self.representation, self.spatial)
        _check_threshold(self.threshold)
        if self.fg_rule not in FG_RULES:
            raise PoolingError(f"fg_rule must be one of {FG_RULES}, got {self.fg_rule!r}")
        if (self.mask is None) != (self.spatial == "mean"):
            raise PoolingError(
                f"spatial={self.spatial!r} with mask={self.mask!r}: the masked variants "
                "(late, fgmean, bg) need a mask source name and 'mean' takes none"
            )
        for name in (self.tap, self.mask):
            if name is not None and not _SAFE.fullmatch(name):
                raise PoolingError(f"{name!r} may only use letters, digits, '-', '_' and '.'")

    @property
    def prefix_array(self) -> str:
        """Name of the store array holding the CLS / register tokens that go with ``tap``."""
        return prefix_array_name(self.tap)

    def fg_array(self, h: int, w: int) -> str:
        """Name of the store array holding this spec's foreground map on an h x w grid."""
        return fg_array_name(self.mask, (h, w), "seed" if self.fg_rule == "seed" else "area")

    def keep(self, fg: Array) -> Array:
        """Foreground cells from the map named by `fg_array` (the seed's map is already 0/1)."""
        return keep_cells(fg, 0.5 if self.fg_rule == "seed" else self.threshold)

    def key(self) -> str:
        """Filesystem-safe name, e.g. ``L.cls-patch.late.gt.area0.5``."""
        parts = [self.tap, self.representation.replace("+", "-"), self.spatial]
        if self.representation != "patch" and self.prefix_array != "prefix":
            parts.append("masked-prefix")  # not the plain run's CLS (caches before that differ)
        if self.mask is not None:
            parts += [self.mask, "seed" if self.fg_rule == "seed" else f"area{self.threshold!r}"]
        return ".".join(parts)
