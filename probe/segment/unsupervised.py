"""`probe segment unsupervised`: foreground masks from a frozen backbone's features, no labels.

- `pca`: the first principal component of each image's patch tokens (all its tiles together,
  centred on the image's mean token), thresholded at 0. Where one object stands out of a fairly
  uniform background, the direction of largest variance separates the two; of its two sides,
  the foreground is the one nearer the image centre (a principal component has no sign of its own).
- `cls-attention` (ViTs): the CLS token's attention to the patch tokens in the last block,
  averaged over heads; foreground = above the image's mean attention. This leans on the
  backbone having learnt to attend to objects (DINO-style training); random weights have not.

Both need no training. With pretrained DINOv2 features the first component is known to isolate
the object; with random-init weights the features only reflect local colour and texture, so the
masks find the salient blob (measured in the tests against trivial baselines, not claimed good).
"""

from pathlib import Path

import torch

from probe.backbones import create_backbone
from probe.data.transforms import Preprocess
from probe.dump import runtime
from probe.errors import ProbeError
from probe.segment.predict import write_masks

METHODS = ("pca", "cls-attention")


def first_component(tokens: torch.Tensor) -> torch.Tensor:
    """Projection of tokens [..., D] onto their first principal component, centred: [...]."""
    with torch.autocast(tokens.device.type, enabled=False):  # bf16 would blur the projection
        flat = tokens.reshape(-1, tokens.shape[-1]).float()
        flat = flat - flat.mean(0)
        direction = torch.linalg.svd(flat, full_matrices=False).Vh[0]
        return (flat @ direction).reshape(tokens.shape[:-1])


def centre_oriented(score: torch.Tensor) -> torch.Tensor:
    """Flip a sign-less score map [H, W] so its positive side lies nearer the image centre."""
    h, w = score.shape
    r2 = torch.linspace(-1, 1, h)[:, None] ** 2 + torch.linspace(-1, 1, w)[None] ** 2
    covariance = ((score - score.mean()) * (r2 - r2.mean())).mean()
    return -score if covariance > 0 else score  # positive side far from the centre: flip


def _pca_scorer(backbone):
    def score(tiles, groups):
        fmap = backbone.forward_taps(tiles, taps=("L",))["L"]
        return torch.cat([first_component(f) for f in fmap.split(groups)])
    return score


def _cls_attention_scorer(backbone):
    if backbone.kind != "vit":
        raise ProbeError(f"--method cls-attention needs a timm ViT backbone (e.g. vit_b); "
                         f"{backbone.name} is a {backbone.kind} model: use --method pca")
    attn = backbone.model.blocks[-1].attn
    seen = {}
    # the last block's attention input (after its norm); weights are recomputed from it because
    # fused attention kernels never materialise them
    attn.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    h, w = backbone.grid("L")

    def score(tiles, groups):
        backbone.forward_taps(tiles, taps=("L",))
        x = seen.pop("x")
        qkv = attn.qkv(x).reshape(*x.shape[:2], 3, attn.num_heads, attn.head_dim)
        q, k = attn.q_norm(qkv[:, :1, 0].transpose(1, 2)), attn.k_norm(qkv[:, :, 1].transpose(1, 2))
        weights = ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(-1)  # [N, heads, 1, T]
        cls_to_patches = weights.mean(1)[:, 0, backbone.num_prefix_tokens:]
        return cls_to_patches.reshape(-1, h, w)
    return score


def unsupervised(backbone: str, data_root: str | Path, out: str | Path, *, method: str = "pca",
                 weights=None, random_init: bool = False, image_size: int | None = None,
                 splits=None, waterbirds_root=None, batch_size: int = 16, workers: int = 2,
                 device: str = "auto", progress: bool = True,
                 model_kwargs: dict | None = None) -> Path:
    """Write unsupervised masks for every image of `splits` into `out` (same layout as predict)."""
    if method not in METHODS:
        raise ProbeError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    bb = create_backbone(backbone, weights=weights, random_init=random_init, image_size=image_size,
                         **(model_kwargs or {}))
    device = runtime(device).device
    bb.to(device)
    if method == "pca":
        score, to_mask = _pca_scorer(bb), lambda s: centre_oriented(s) > 0
    else:
        score, to_mask = _cls_attention_scorer(bb), lambda s: s > s.mean()
    config = dict(kind="unsupervised", method=method, backbone=backbone, weights=bb.weights_id,
                  image_size=bb.image_size, model_kwargs=model_kwargs or {})
    return write_masks(data_root, out, score, Preprocess(bb.image_size, bb.mean, bb.std),
                       config=config, to_mask=to_mask, splits=splits,
                       waterbirds_root=waterbirds_root, batch_size=batch_size, workers=workers,
                       device=device, progress=progress)
