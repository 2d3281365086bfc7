"""Frozen vision backbones behind one API: spatial feature maps ("taps") of the last stage (L),
of the stage before it (L-1), and of the last stage recomputed from a background-zeroed L-1 map.

Taps are channels-last maps [B, h, w, D]; ViT prefix tokens (CLS first, then registers) come
separately as "prefix" [B, P, D]. "L-1" is the raw output of the second-to-last ViT block (no
final norm, patch tokens only) or of ConvNeXt's second-to-last stage: the map the study masks.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import os
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import timm
import torch
from timm.models.convnext import ConvNeXt
from timm.models.vision_transformer import VisionTransformer

from probe import hub
from probe.errors import ProbeError, WeightsUnavailableError


class Entry(NamedTuple):
    timm_id: str  # timm architecture
    tag: str  # timm pretrained tag (its weights live on the Hugging Face hub)
    image_size: int
    description: str


REGISTRY: dict[str, Entry] = {
    "vit_s": Entry("vit_small_patch14_dinov2", "lvd142m", 518, "DINOv2 ViT-S/14, 518 px"),
    "vit_b": Entry("vit_base_patch14_dinov2", "lvd142m", 518, "DINOv2 ViT-B/14, 518 px"),
    "vit_l": Entry("vit_large_patch14_dinov2", "lvd142m", 518, "DINOv2 ViT-L/14, 518 px"),
    "vit_s_reg": Entry("vit_small_patch14_reg4_dinov2", "lvd142m", 518,
                       "DINOv2 ViT-S/14 with 4 registers, 518 px"),
    "vit_b_reg": Entry("vit_base_patch14_reg4_dinov2", "lvd142m", 518,
                       "DINOv2 ViT-B/14 with 4 registers, 518 px"),
    "vit_l_reg": Entry("vit_large_patch14_reg4_dinov2", "lvd142m", 518,
                       "DINOv2 ViT-L/14 with 4 registers, 518 px"),
    "convnext_s": Entry("convnext_small", "fb_in1k", 224, "ConvNeXt-S, ImageNet-1k, 224 px"),
    "convnext_b": Entry("convnext_base", "fb_in1k", 224, "ConvNeXt-B, ImageNet-1k, 224 px"),
    "convnext_l": Entry("convnext_large", "fb_in1k", 224, "ConvNeXt-L, ImageNet-1k, 224 px"),
}
MASKED = "L.from-masked-L-1"
RANDOM_INIT_SEED = 0  # random-init weights are identical in every process, so dumps agree


def list_backbones() -> dict[str, str]:
    """Registry short names -> descriptions (any timm name or hf:<id> works too)."""
    return {name: e.description for name, e in REGISTRY.items()}


class Backbone(torch.nn.Module):
    """Eval-mode wrapper with one tap API; subclasses supply the per-architecture pieces."""

    kind = ""
    taps: tuple[str, ...] = ("L",)
    channels_last = False  # the dumper feeds channels_last tensors to conv nets (faster on GPU)
    num_prefix_tokens = 0

    def __init__(self, model: torch.nn.Module, *, name: str, model_id: str, weights_id: str,
                 image_size: int, mean, std):
        super().__init__()
        self.model, self.name, self.model_id, self.weights_id = model, name, model_id, weights_id
        self.image_size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)
        self.eval()
        self._shapes = self._infer_shapes()  # spatial tap -> (h, w, D)

    def _infer_shapes(self) -> dict[str, tuple[int, int, int]]:
        """One dummy forward: conv net grids depend on padding rules, not just strides."""
        with torch.no_grad():
            out = self.forward_taps(torch.zeros(1, 3, self.image_size, self.image_size),
                                    taps=[t for t in ("L", "L-1") if t in self.taps])
        return {k: tuple(v.shape[1:]) for k, v in out.items()}

    def grid(self, tap: str) -> tuple[int, int]:
        return self._shape(tap)[:2]

    def dim(self, tap: str) -> int:
        return self._shape("L" if tap == "prefix" else tap)[2]

    def _shape(self, tap: str) -> tuple[int, int, int]:
        key = "L" if tap == MASKED else tap
        if key not in self._shapes:
            raise ProbeError(f"backbone {self.name} has no spatial tap {tap!r}; "
                             f"it has {sorted(self._shapes)}")
        return self._shapes[key]

    def head_norm(self) -> dict | None:
        return None

    def forward(self, x: torch.Tensor, taps=("L",), lm1_keep: torch.Tensor | None = None):
        return self.forward_taps(x, taps, lm1_keep)

    def forward_taps(self, x: torch.Tensor, taps=("L",),
                     lm1_keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Requested taps of a normalised batch x [B,3,S,S]; MASKED too when lm1_keep is given.

        The trunk runs once up to L-1; the last stage then runs on the plain and the masked
        L-1 state as one concatenated batch: this is the costly step of the whole toolkit.
        """
        taps = set(taps)
        self._validate(x, taps, lm1_keep)
        state = self.trunk(x, need_lm1="L-1" in taps)
        out = {}
        if "L-1" in taps:
            out["L-1"] = self.to_map(self._lm1(state))[0]
        runs = [state] if taps & {"L", "prefix"} else []
        if lm1_keep is not None:
            runs.append(self.mask_state(state, lm1_keep))
        if runs:
            maps, prefix = self.to_map(self.last_stage(runs[0] if len(runs) == 1 else torch.cat(runs)))
            b = x.shape[0]
            if "L" in taps:
                out["L"] = maps[:b]
            if "prefix" in taps:
                out["prefix"] = prefix[:b]
            if lm1_keep is not None:
                out[MASKED] = maps[-b:]
                if prefix is not None:  # the CLS that attended to the masked map
                    out[f"prefix.{MASKED}"] = prefix[-b:]
        return out

    def _validate(self, x, taps, lm1_keep) -> None:
        if taps - set(self.taps):
            raise ProbeError(f"backbone {self.name} ({self.kind}) has no tap(s) "
                             f"{sorted(taps - set(self.taps))}; available: {list(self.taps)}")
        if MASKED in taps and lm1_keep is None:
            raise ProbeError(f"tap {MASKED!r} needs lm1_keep, the foreground map on the L-1 grid")
        if lm1_keep is not None and MASKED not in self.taps:
            raise ProbeError(f"backbone {self.name} ({self.kind}) cannot recompute L from a "
                             f"masked L-1 map; its taps: {list(self.taps)}")
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ProbeError(f"backbone {self.name} expects {self.image_size}x{self.image_size} "
                             f"inputs, got {tuple(x.shape[-2:])}")
        if lm1_keep is not None and tuple(lm1_keep.shape) != (x.shape[0], *self.grid("L-1")):
            raise ProbeError(f"lm1_keep has shape {tuple(lm1_keep.shape)}, expected "
                             f"{(x.shape[0], *self.grid('L-1'))} (batch, L-1 grid)")

    # Per architecture, public so fine-tuning runs the same computation with gradients:
    # trunk (input -> L-1 state), _lm1 (state -> L-1 features), mask_state (zero the background
    # of the state), last_stage (state -> last-stage features), to_map (-> NHWC + prefix).
    def _lm1(self, state):
        return state

    def to_map(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return y.permute(0, 2, 3, 1), None  # NCHW feature map, no prefix tokens


class TokenBackbone(Backbone):
    """Token sequences whose first num_prefix_tokens are CLS / register tokens."""

    def _infer_shapes(self):
        h = self.image_size // self.patch_size
        return {"L": (h, h, self.width), "L-1": (h, h, self.width)}

    def to_map(self, y):
        (h, w, _), p = self._shapes["L"], self.num_prefix_tokens
        if y.shape[1] != p + h * w:
            raise ProbeError(f"backbone {self.name} returned {y.shape[1]} tokens, expected "
                             f"{p} prefix + {h}x{w} patch tokens")
        return y[:, p:].reshape(y.shape[0], h, w, y.shape[-1]), y[:, :p]


class ViTBackbone(TokenBackbone):
    kind = "vit"
    num_prefix_tokens = property(lambda self: self.model.num_prefix_tokens)
    patch_size = property(lambda self: self.model.patch_embed.patch_size[0])
    width = property(lambda self: self.model.embed_dim)

    @property
    def taps(self):
        return ("L", "L-1", MASKED) + (("prefix",) if self.num_prefix_tokens else ())

    def trunk(self, x, need_lm1=False):
        # VisionTransformer.forward_features, stopped before the last block.
        m = self.model
        return m.blocks[:-1](m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x)))))

    def mask_state(self, tokens, keep):
        p = self.num_prefix_tokens  # prefix (CLS / register) tokens are never masked
        return torch.cat([tokens[:, :p], tokens[:, p:] * keep.flatten(1)[..., None].to(tokens)], 1)

    def last_stage(self, tokens):
        return self.model.norm(self.model.blocks[-1](tokens))


class ConvNeXtBackbone(Backbone):
    kind, taps, channels_last = "convnext", ("L", "L-1", MASKED), True

    def trunk(self, x, need_lm1=False):
        return self.model.stages[:-1](self.model.stem(x))

    def mask_state(self, fmap, keep):
        return fmap * keep[:, None].to(fmap)

    def last_stage(self, fmap):
        # ConvNeXt.forward_features from the last stage (which starts with its own downsample).
        return self.model.norm_pre(self.model.stages[-1](fmap))

    def head_norm(self):
        norm = self.model.head.norm
        if getattr(norm, "weight", None) is None:  # head_norm_first variants: norm is inside "L"
            return None
        return {"weight": norm.weight.detach().cpu().numpy().copy(),
                "bias": norm.bias.detach().cpu().numpy().copy(), "eps": float(norm.eps)}


class CNNBackbone(Backbone):
    """Any other timm model whose forward_features is a spatial map; tap "L" only."""

    kind, channels_last = "cnn", True

    def trunk(self, x, need_lm1=False):
        y = self.model.forward_features(x)
        if y.ndim != 4:
            raise ProbeError(f"timm model {self.model_id} gives {y.ndim}-d features, not a "
                             "spatial map; use a ViT or a convolutional model")
        return y.permute(0, 3, 1, 2) if getattr(self.model, "output_fmt", "") == "NHWC" else y

    def last_stage(self, y):
        return y


class HFBackbone(TokenBackbone):
    """A transformers ViT-style model. "L-1" is hidden_states[-2], the raw output of the
    second-to-last layer as for timm ViTs. Recomputing L from a masked L-1 map would need each
    architecture's internals, so it is not offered: use the timm twin (e.g. vit_b) for that."""

    kind, taps = "hf", ("L", "L-1", "prefix")
    num_prefix_tokens = property(
        lambda self: 1 + int(getattr(self.model.config, "num_register_tokens", 0) or 0))
    patch_size = property(lambda self: int(self.model.config.patch_size))
    width = property(lambda self: int(self.model.config.hidden_size))

    def trunk(self, x, need_lm1=False):
        return self.model(pixel_values=x, output_hidden_states=need_lm1)

    def _lm1(self, out):
        return out.hidden_states[-2]

    def last_stage(self, out):
        return out.last_hidden_state


# ------------------------------------------------------------------ construction and weights

def create_backbone(name: str, *, weights: str | os.PathLike | None = None,
                    random_init: bool = False, image_size: int | None = None,
                    **model_kwargs) -> Backbone:
    """A registry short name, any timm model name, or hf:<hub id or local folder>.

    Weights: the timm pretrained tag from the Hugging Face cache (default), a local file
    (weights=), or a fixed-seed random initialisation (random_init=True). model_kwargs go to
    timm.create_model (e.g. depth=2 to shrink an architecture in tests), or for hf: models
    override fields of the model's config (e.g. drop_path_rate=0.1).
    """
    if weights is not None and random_init:
        raise ProbeError("pass either weights=FILE (--weights) or --random-init, not both")
    if name.startswith("hf:"):
        return _create_hf(name, weights, random_init, image_size, model_kwargs)
    entry = REGISTRY.get(name)
    model_id = f"{entry.timm_id}.{entry.tag}" if entry else name
    if not timm.is_model(model_id):
        close = difflib.get_close_matches(name, [*REGISTRY, *timm.list_models()], n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ProbeError(f"unknown backbone {name!r}.{hint} Short names: {', '.join(REGISTRY)}; "
                         "any timm model name (timm.list_models()) or hf:<hub id or folder> works.")
    cfg = timm.models.get_pretrained_cfg(model_id)
    image_size = image_size or (entry.image_size if entry else cfg.input_size[-1] if cfg else 224)
    kwargs = {"num_classes": 0, **model_kwargs}  # classifier heads are never used
    if cfg is not None and cfg.fixed_input_size:  # ViTs: resize the position embeddings
        kwargs.setdefault("img_size", image_size)
    with _seeded():
        model = timm.create_model(model_id, pretrained=False, **kwargs)
    pcfg = model.pretrained_cfg
    model_id = ".".join(filter(None, (pcfg.get("architecture"), pcfg.get("tag")))) or model_id
    if isinstance(model, VisionTransformer):
        cls = ViTBackbone
        _check_multiple(name, image_size, model.patch_embed.patch_size[0])
    else:
        cls = ConvNeXtBackbone if isinstance(model, ConvNeXt) else CNNBackbone

    def pretrained() -> str:
        path = _download_timm(name, model_id, pcfg)
        _load_state_dict(model, _read_state_dict(path), f"{model_id} from the Hugging Face cache")
        return f"timm:{model_id}"

    weights_id = _load_weights(model, weights, random_init, pretrained)
    data = timm.data.resolve_model_data_config(model)
    return cls(model, name=name, model_id=model_id, weights_id=weights_id,
               image_size=image_size, mean=data["mean"], std=data["std"])


def _hf_source(name: str):
    """(ref, fetch) for hf:<ref>: a local folder (~ expanded) is read as it is; a hub id from
    the cache, else from the Hub if it answers."""
    ref = name[3:]
    folder = Path(ref).expanduser()
    if folder.is_dir():
        return str(folder), lambda load: load(True)
    if ref.startswith(("/", "./", "../", "~")):
        raise WeightsUnavailableError(f"{name}: no such folder; pass a folder written by "
                                      "save_pretrained, or a Hugging Face hub id")
    return ref, hub.cached_or_download


def _hf_unavailable(name: str, e: OSError) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"Hugging Face model {name[3:]!r} is not available ({str(e).splitlines()[0]}). Pass a "
        "folder written by save_pretrained as hf:/path/to/folder, or set HF_HOME to a Hugging "
        "Face cache holding it; timm backbones also take --weights FILE or --random-init.")


def hf_config(name: str):
    """The transformers config of ``hf:<hub id or folder>``, read without building the model."""
    import transformers

    ref, fetch = _hf_source(name)
    try:
        return fetch(
            lambda local: transformers.AutoConfig.from_pretrained(ref, local_files_only=local))
    except OSError as e:
        raise _hf_unavailable(name, e) from None


def _create_hf(name: str, weights, random_init: bool, image_size: int | None,
               overrides: dict) -> HFBackbone:
    import transformers

    (ref, fetch), config = _hf_source(name), hf_config(name)
    unknown = sorted(set(overrides) - set(config.to_dict()))  # fields only, never methods
    if unknown:
        raise ProbeError(f"{name}: its {type(config).__name__} has no field(s) {unknown}; "
                         "model options of hf: backbones override config fields")
    config.update(overrides)
    try:
        if weights is None and not random_init:
            model = fetch(lambda local: transformers.AutoModel.from_pretrained(
                ref, config=config, local_files_only=local))
        else:
            with _seeded():
                model = transformers.AutoModel.from_config(config)
    except OSError as e:
        raise _hf_unavailable(name, e) from None
    model, cfg = model.float(), model.config
    if not hasattr(cfg, "patch_size") or not hasattr(cfg, "hidden_size"):
        raise ProbeError(f"{name}: only ViT-style Hugging Face models (with a patch_size) work")
    image_size = image_size or int(cfg.image_size)
    _check_multiple(name, image_size, int(cfg.patch_size))

    def pretrained() -> str:  # already loaded: name a folder by its content, a repo by its commit
        if Path(ref).is_dir():
            files = sorted(p for p in Path(ref).iterdir() if p.suffix in (".safetensors", ".bin"))
            return f"file:sha256:{_sha256(files)}"
        from huggingface_hub import try_to_load_from_cache

        # the snapshot the weights were read from: <cache>/models--org--name/snapshots/<commit>/
        cached = try_to_load_from_cache(ref, "config.json")
        return f"hf:{ref}" + (f"@{Path(cached).parent.name}" if isinstance(cached, str) else "")

    weights_id = _load_weights(model, weights, random_init, pretrained)
    try:  # the processor's normalisation, read from its config without instantiating it
        mixin = transformers.image_processing_utils.ImageProcessingMixin
        proc = fetch(lambda local: mixin.get_image_processor_dict(ref, local_files_only=local))[0]
    except hub.HubUnreachable as e:  # unless known not to exist, the statistics are a guess
        if not hub.known_missing(ref, "preprocessor_config.json"):
            warnings.warn(f"{name}: the image processor config is {e}; normalising with "
                          "ImageNet mean/std, which may not be this model's", stacklevel=3)
        proc = {}
    except OSError:  # no processor config: DINOv2-style models use ImageNet statistics
        proc = {}
    return HFBackbone(model, name=name, model_id=ref, weights_id=weights_id,
                      image_size=image_size,
                      mean=proc.get("image_mean", timm.data.IMAGENET_DEFAULT_MEAN),
                      std=proc.get("image_std", timm.data.IMAGENET_DEFAULT_STD))


def _check_multiple(name: str, image_size: int, patch: int) -> None:
    if image_size % patch:
        lo = image_size // patch * patch
        valid = ", ".join(str(s) for s in (lo, lo + patch) if s > 0)
        raise ProbeError(f"image size {image_size} is not a multiple of {name}'s patch size "
                         f"{patch}; use a multiple of {patch}, e.g. {valid}")


@contextlib.contextmanager
def _seeded():
    """Fixed-seed CPU RNG while a model is built; the caller's RNG state is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        yield


def _load_weights(model: torch.nn.Module, weights, random_init: bool, pretrained) -> str:
    """Load weights= into the model (or keep its random init); pretrained() otherwise.
    Returns the weights_id."""
    if random_init:
        return "random-init"
    if weights is None:
        return pretrained()
    _load_state_dict(model, _read_state_dict(weights), str(weights))
    return f"file:sha256:{_sha256([Path(weights)])}"


def _download_timm(name: str, model_id: str, pcfg: dict) -> str:
    """Path of the pretrained file in the Hugging Face cache, downloading it if the Hub is
    reachable. timm's current file name first, then the older one."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo = pcfg.get("hf_hub_id")
    files = [pcfg.get("hf_hub_filename") or "model.safetensors", "pytorch_model.bin"]
    for file in files if repo else []:
        try:
            return hf_hub_download(repo, file, local_files_only=True)  # cached: no network
        except (OSError, ValueError):  # not cached, or a cache it cannot read: the Hub decides
            pass
    reason = hub.unreachable() if repo else "timm knows no Hugging Face repository for it"
    for file in files if reason is None else []:
        try:
            return hf_hub_download(repo, file)
        except Exception as e:  # no such file, a network failure: all end in the same advice
            reason = f"downloading {repo} failed ({str(e).splitlines()[0] if str(e) else repr(e)})"
            remote_miss = isinstance(e, EntryNotFoundError) and \
                not isinstance(e, LocalEntryNotFoundError)
            if not remote_miss:  # only a file the repository lacks may have another name
                break
    raise WeightsUnavailableError(
        f"pretrained weights for {name!r} (timm {model_id}) are not in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}) and {reason}. Either pass a local checkpoint with --weights "
        "FILE (.safetensors or torch .pt/.pth), run with --random-init, or set HF_HOME to a "
        "Hugging Face cache that holds them.")


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Safetensors or torch checkpoint (weights_only); unnested, "module." prefixes stripped."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file {path} does not exist; pass an existing "
                                      ".safetensors or torch checkpoint, or use --random-init")
    try:
        if path.suffix == ".safetensors":
            import safetensors.torch
            sd = safetensors.torch.load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign files fail in many library-specific ways
        raise WeightsUnavailableError(f"cannot read weights file {path}: {e}") from None
    for key in ("model", "state_dict"):  # training checkpoints nest the weights
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsUnavailableError(f"weights file {path} holds no state dict of tensors "
                                      "(expected one, possibly under 'model' or 'state_dict')")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _load_state_dict(model: torch.nn.Module, sd: dict, source: str) -> None:
    """Strict load, classifier-head keys aside. The timm module's checkpoint_filter_fn first
    converts foreign layouts (e.g. original DINOv2) and resamples position embeddings."""
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None and hasattr(model, "pretrained_cfg"):
        try:
            sd = filter_fn(sd, model)
        except Exception as e:  # timm's converters assume well-formed checkpoints
            raise WeightsUnavailableError(
                f"weights in {source} cannot be adapted to this model: {e}") from None
    heads = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    own = model.state_dict()

    def is_head(key: str) -> bool:
        return any(key == h or key.startswith(h + ".") for h in heads)

    sd = {k: v for k, v in sd.items() if k in own or not is_head(k)}
    checks = {
        "key(s) of another shape": [f"{k} (model {tuple(own[k].shape)}, file {tuple(v.shape)})"
                                    for k, v in sd.items() if k in own and own[k].shape != v.shape],
        "missing key(s)": [k for k in own if k not in sd and not is_head(k)],
        "unexpected key(s)": [k for k in sd if k not in own],
    }
    problems = [f"{len(keys)} {label}: {', '.join(keys[:3])}{', ...' * (len(keys) > 3)}"
                for label, keys in checks.items() if keys]
    if problems:
        raise WeightsUnavailableError(
            f"weights in {source} do not fit the model: {'; '.join(problems)}. Check that they "
            "were saved from the same architecture and model options (image size aside).")
    model.load_state_dict(sd, strict=False)  # strictness checked above, classifier head aside


def _sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()[:16]
