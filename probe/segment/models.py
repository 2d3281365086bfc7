"""Binary (background / bird) segmenters behind one small interface.

`scores(x)` maps normalised square images [B, 3, S, S] to foreground scores [B, h, w] on the
model's own grid (> 0 = bird); callers upsample them bilinearly to the pixels they need, so
training, prediction and tiling share one geometry. `loss(x, area, binary)` is the training
objective given the mask in the same frame (area fractions and nearest-neighbour binary, as
probe.data.transforms.Preprocess.mask returns them).

A trained segmenter is a folder: segmenter.json (its `spec`, enough to rebuild the architecture
offline, plus training metadata) and segmenter.safetensors (the trained weights only: a light
model's frozen backbone is rebuilt from its recorded weights, not copied).
"""

import difflib
import json
from pathlib import Path

import safetensors.torch
import timm.data
import torch
import torch.nn.functional as F
from torch import nn

from probe import hub
from probe.backbones import Backbone, create_backbone
from probe.data.transforms import Preprocess
from probe.errors import ConfigMismatchError, ProbeError, WeightsUnavailableError
from probe.finetune import checkpoint
from probe.segment import MODELS
from probe.segment.files import write_json

MASK2FORMER_HUB = "facebook/mask2former-swin-tiny-ade-semantic"
MASK2FORMER_SIZE = 384
# Swin-T as in the hub checkpoint, so a random-init model has the same architecture offline.
SWIN_T = dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
              drop_path_rate=0.3, out_features=["stage1", "stage2", "stage3", "stage4"])
LABELS = {0: "background", 1: "bird"}
SPEC_FILE, WEIGHTS_FILE = "segmenter.json", "segmenter.safetensors"


class Segmenter(nn.Module):
    bf16_training = True  # whether training may run under CUDA bf16 autocast

    def __init__(self, spec: dict, mean, std):
        super().__init__()
        self.spec = spec
        self.preprocess = Preprocess(spec["image_size"], tuple(mean), tuple(std))

    def trainable(self) -> nn.Module:
        """The part that is trained, optimised and saved."""
        raise NotImplementedError

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, x: torch.Tensor, area: torch.Tensor, binary: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Decoder(nn.Module):
    """Per-cell features -> one logit per cell; a 3x3 convolution lets neighbouring cells agree."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm, self.proj = nn.LayerNorm(dim), nn.Linear(dim, hidden)
        self.mix, self.out = nn.Conv2d(hidden, hidden, 3, padding=1), nn.Conv2d(hidden, 1, 1)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:  # [B, h, w, D] -> [B, h, w]
        x = F.gelu(self.proj(self.norm(fmap))).permute(0, 3, 1, 2)
        return self.out(x + F.gelu(self.mix(x)))[:, 0]


class LightSegmenter(Segmenter):
    """Per-cell logits on the frozen backbone's last-stage grid ("L")."""

    def __init__(self, backbone: Backbone, spec: dict):
        super().__init__(spec, backbone.mean, backbone.std)
        self.backbone = backbone.requires_grad_(False)
        self.decoder = Decoder(backbone.dim("L"), spec["hidden"])

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: its dropout / drop-path stay off while the decoder trains
        return self

    def trainable(self):
        return self.decoder

    def scores(self, x):
        with torch.no_grad():
            fmap = self.backbone.forward_taps(x, taps=("L",))["L"]
        return self.decoder(fmap.float())

    def loss(self, x, area, binary):
        logits = F.interpolate(self.scores(x)[:, None], size=area.shape[-2:], mode="bilinear",
                               align_corners=False)[:, 0]
        return F.binary_cross_entropy_with_logits(logits.float(), area)  # soft edges as targets


class Mask2FormerSegmenter(Segmenter):
    """Semantic segmentation with two classes; the score is P(bird) - P(background) per pixel."""

    # its Hungarian matcher hands the cost matrix to scipy, which cannot read bf16 tensors
    bf16_training = False

    def __init__(self, model: nn.Module, spec: dict):
        super().__init__(spec, timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD)
        self.model = model

    def trainable(self):
        return self.model

    def scores(self, x):
        out = self.model(pixel_values=x)
        # transformers' post_process_semantic_segmentation, without its resize
        classes = out.class_queries_logits.float().softmax(-1)[..., :-1]  # drop "no object"
        maps = torch.einsum("bqc,bqhw->bchw", classes, out.masks_queries_logits.float().sigmoid())
        return maps[:, 1] - maps[:, 0]

    def loss(self, x, area, binary):
        masks, classes = [], []
        for fg in binary > 0.5:  # one target mask per class present in the image
            present = [(c, m) for c, m in ((0, ~fg), (1, fg)) if m.any()]
            masks.append(torch.stack([m for _, m in present]).float())
            classes.append(torch.tensor([c for c, _ in present], device=x.device))
        return self.model(pixel_values=x, mask_labels=masks, class_labels=classes).loss


def check_model_name(name: str) -> None:
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS), n=3, cutoff=0.4)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise ProbeError(f"unknown segmentation model {name!r}.{hint} Choose from: "
                         f"{', '.join(MODELS)} (see `probe segment train --help`)")


def build(model: str, *, backbone: str | None = None, weights=None, random_init: bool = False,
          image_size: int | None = None, hidden: int = 128,
          model_kwargs: dict | None = None) -> Segmenter:
    """A new segmenter to train. `weights`: the light model's backbone weights file, or
    Mask2Former's pretrained checkpoint (hub id or save_pretrained folder). `model_kwargs`
    shrink the architecture in tests (timm kwargs, or Mask2Former config fields with a
    "backbone" dict of Swin fields)."""
    check_model_name(model)
    kwargs = dict(model_kwargs or {})
    if model == "light":
        if not backbone:
            raise ProbeError("--model light needs --backbone (e.g. vit_s, convnext_s, or any "
                             "timm model name; see `probe backbones`)")
        return _light(dict(model=model, backbone=backbone, random_init=random_init,
                           image_size=image_size,
                           weights=str(Path(weights).expanduser().resolve()) if weights else None,
                           hidden=hidden, model_kwargs=kwargs))
    if backbone:
        raise ProbeError(f"--backbone is for --model light; {model} has its own Swin-T backbone")
    spec = dict(model=model, image_size=image_size or MASK2FORMER_SIZE,
                source="random-init" if random_init else str(weights or MASK2FORMER_HUB))
    return _mask2former(spec, kwargs)


def _light(spec: dict) -> LightSegmenter:
    bb = create_backbone(spec["backbone"], weights=spec["weights"], random_init=spec["random_init"],
                         image_size=spec["image_size"], **spec["model_kwargs"])
    if spec.get("weights_id", bb.weights_id) != bb.weights_id:
        raise ConfigMismatchError(
            f"backbone {spec['backbone']} now loads weights {bb.weights_id}, but the segmenter was "
            f"trained on {spec['weights_id']}; restore those weights (the same --weights file)")
    return LightSegmenter(bb, {**spec, "image_size": bb.image_size, "weights_id": bb.weights_id})


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ProbeError("Mask2Former needs the transformers package: pip install "
                         "'masking-probe[hf]', or use --model light --backbone NAME") from None
    return transformers


def _mask2former(spec: dict, model_kwargs: dict) -> Mask2FormerSegmenter:
    """From spec["config"] when rebuilding a trained model (offline, no download); otherwise
    from the pretrained checkpoint, or from a fresh Swin-T config for random-init."""
    tf = _transformers()
    cls = tf.Mask2FormerForUniversalSegmentation
    labels = dict(num_labels=2, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    if "config" in spec:
        return Mask2FormerSegmenter(cls(tf.Mask2FormerConfig.from_dict(spec["config"])), spec)
    if spec["source"] == "random-init":
        swin = tf.SwinConfig(**{**SWIN_T, **model_kwargs.pop("backbone", {})})
        model = cls(tf.Mask2FormerConfig(backbone_config=swin, **labels, **model_kwargs))
    else:
        try:  # the class head is replaced: ADE's 150 classes -> background / bird
            model = hub.cached_or_download(lambda local: cls.from_pretrained(
                spec["source"], ignore_mismatched_sizes=True, local_files_only=local, **labels,
                **model_kwargs))
        except OSError as e:
            raise WeightsUnavailableError(
                f"Mask2Former weights {spec['source']!r} are not available "
                f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}). "
                f"Download {MASK2FORMER_HUB} once where there is network and set HF_HOME to that "
                "Hugging Face cache, or pass a folder written by save_pretrained with --weights "
                "FOLDER; without weights, train --model light --backbone NAME instead.") from None
    spec = {**spec, "config": json.loads(model.config.to_json_string())}
    return Mask2FormerSegmenter(model, spec)


def save(seg: Segmenter, folder: Path, extra: dict) -> None:
    """Weights first, then the JSON: a folder with segmenter.json is always a complete model."""
    checkpoint.save_weights(seg.trainable(), folder / WEIGHTS_FILE)
    write_json(folder / SPEC_FILE, {"spec": seg.spec, **extra})


def load(folder: str | Path) -> Segmenter:
    folder = Path(folder).expanduser()
    if not (folder / SPEC_FILE).is_file():
        hint = (" Its training was interrupted: run `probe segment train` again with --resume."
                if checkpoint.latest(folder) else "")
        raise ProbeError(f"no trained segmenter in {folder} ({SPEC_FILE} is missing).{hint} "
                         "Train one with `probe segment train --out FOLDER`.")
    spec = json.loads((folder / SPEC_FILE).read_text(encoding="utf-8"))["spec"]
    seg = _light(spec) if spec["model"] == "light" else _mask2former(spec, {})
    load_weights(seg, folder / WEIGHTS_FILE)
    return seg.eval()


def load_weights(seg: Segmenter, path: Path) -> None:
    try:
        missing, unexpected = safetensors.torch.load_model(seg.trainable(), str(path), strict=False)
    except Exception as e:  # missing, truncated or foreign files fail in library-specific ways
        raise ProbeError(f"cannot read segmenter weights {path}: {e}") from None
    if missing or unexpected:
        raise ConfigMismatchError(f"{path} does not fit the model in its folder's {SPEC_FILE} "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
