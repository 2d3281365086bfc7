"""`probe segment train`: fit a binary segmenter on CUB train images and their annotations.

Every epoch ends with a checkpoint in the layout of `probe finetune` (probe.finetune.checkpoint:
trained weights in safetensors, optimiser / scheduler / RNG state in a small torch file). The
data order and the flips of epoch e depend only on (seed, e),
so a run resumed from a checkpoint reproduces an uninterrupted run exactly.
"""

import math
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from probe.data.cub import CUB
from probe.data.loading import batches
from probe.dump import check_masks, runtime
from probe.errors import ConfigMismatchError, ProbeError
from probe.finetune import checkpoint
from probe.segment.models import SPEC_FILE, build, check_model_name, save

DEFAULTS = {  # per model: a frozen-backbone decoder tolerates a much larger step than Mask2Former
    "light": dict(epochs=10, batch_size=32, lr=1e-3, weight_decay=1e-4),
    "mask2former-swin-t": dict(epochs=50, batch_size=16, lr=1e-4, weight_decay=0.05),
}


class _Pairs(torch.utils.data.Dataset):
    """(image, mask area fractions, mask nearest binary), all in the model's input frame."""

    def __init__(self, cub: CUB, preprocess):
        self.cub, self.preprocess = cub, preprocess

    def __len__(self):
        return len(self.cub)

    def __getitem__(self, i):
        sample = self.cub[i]
        return (self.preprocess.image(sample.image), *self.preprocess.mask(sample.mask))


def default_out(model: str, backbone: str | None) -> Path:
    return Path("segmenters") / (f"{model}-{backbone}" if backbone else model)


def train(data_root: str | Path, *, model: str = "mask2former-swin-t", backbone: str | None = None,
          weights=None, random_init: bool = False, image_size: int | None = None,
          out: str | Path | None = None, epochs: int | None = None, batch_size: int | None = None,
          lr: float | None = None, weight_decay: float | None = None, hidden: int = 128,
          seed: int = 0, workers: int = 2, device: str = "auto", resume: bool = False,
          progress: bool = True, model_kwargs: dict | None = None) -> Path:
    """Train on split `train` with the CUB ground-truth masks; returns the segmenter folder."""
    check_model_name(model)
    root = Path(data_root).expanduser()
    out = Path(out).expanduser() if out else default_out(model, backbone)
    given = dict(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay)
    hp = {k: given[k] if given[k] is not None else v for k, v in DEFAULTS[model].items()}
    if hp["epochs"] < 1 or hp["batch_size"] < 1:
        raise ProbeError(f"--epochs and --batch-size must be at least 1, got {hp['epochs']} and "
                         f"{hp['batch_size']}")
    cub = CUB(root, "train", masks="gt")
    check_masks(cub, cub.masks)
    config = dict(model=model, backbone=backbone, weights=str(weights) if weights else None,
                  random_init=random_init, image_size=image_size, hidden=hidden, seed=seed,
                  model_kwargs=model_kwargs or {}, dataset=cub.index.fingerprint(), **hp)
    if _existing(out, resume):
        return out
    device = runtime(device).device
    torch.manual_seed(seed)  # the decoder / class head initialisation
    seg = build(model, backbone=backbone, weights=weights, random_init=random_init,
                image_size=image_size, hidden=hidden, model_kwargs=model_kwargs).to(device)
    params = [p for p in seg.trainable().parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=hp["lr"], weight_decay=hp["weight_decay"])
    steps = hp["epochs"] * math.ceil(len(cub) / hp["batch_size"])
    sched = torch.optim.lr_scheduler.LambdaLR(  # cosine decay to 0 over the whole run
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    start, history = _resume(out, seg, opt, sched, config) if resume else (0, [])
    data = _Pairs(cub, seg.preprocess)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                if device.type == "cuda" and seg.bf16_training else nullcontext())
    for epoch in range(start, hp["epochs"]):
        order = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        loader = batches(data, batch_size=hp["batch_size"], workers=workers,
                         sampler=torch.randperm(len(data), generator=order).tolist())
        seg.train()
        total, seen = 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{hp['epochs']}", unit="batch",
                   total=math.ceil(len(data) / hp["batch_size"]), disable=not progress)
        for items in bar:
            x, area, binary = (torch.stack(t) for t in zip(*items))
            flip = torch.rand(len(x), generator=order) < 0.5  # the same flip for image and mask
            x, area, binary = (torch.where(flip.view(-1, *[1] * (t.ndim - 1)), t.flip(-1), t)
                               .to(device, non_blocking=True) for t in (x, area, binary))
            with autocast:
                loss = seg.loss(x, area, binary)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, seen = total + loss.item() * len(x), seen + len(x)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        history.append(total / max(seen, 1))
        _save_checkpoint(out, epoch + 1, seg, opt, sched, config, history)
    save(seg, out, {"train": config, "loss_per_epoch": history})
    for old in out.glob(f"{checkpoint.PREFIX}*"):  # the final model supersedes them
        shutil.rmtree(old)
    return out


def _existing(out: Path, resume: bool) -> bool:
    """True when `out` already holds the finished model and resume was asked."""
    if (out / SPEC_FILE).is_file():
        if resume:
            tqdm.write(f"{out}: training already finished, nothing to do")
            return True
        raise ProbeError(f"{out} already holds a trained segmenter; choose another --out or "
                         "delete that folder")
    found = checkpoint.latest(out)
    if found and not resume:
        raise ProbeError(f"{out} holds an unfinished run ({found.name}); pass --resume to "
                         "continue it, or delete the folder to start over")
    return False


def _save_checkpoint(out: Path, epoch: int, seg, opt, sched, config: dict, history: list) -> None:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    checkpoint.save(out, epoch, seg.trainable(), dict(
        epoch=epoch, config=config, optimizer=opt.state_dict(), scheduler=sched.state_dict(),
        rng=rng, history=history))


def _resume(out: Path, seg, opt, sched, config: dict) -> tuple[int, list]:
    """Restore the newest checkpoint into seg/opt/sched; (first epoch to run, loss history)."""
    found = checkpoint.latest(out)
    if found is None:
        return 0, []
    # settings first: another architecture would otherwise fail as an unreadable checkpoint
    saved = torch.load(found / "state.pt", map_location="cpu", weights_only=True)["config"]
    if saved != config:
        keys = sorted(k for k in config if saved.get(k) != config[k])
        raise ConfigMismatchError(
            f"the checkpoint in {out} was made with other settings ({', '.join(keys)}: "
            f"{[saved.get(k) for k in keys]}); repeat them to resume, or delete the folder")
    state = checkpoint.load(found, seg.trainable())
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    tqdm.write(f"{out}: resuming after epoch {state['epoch']}")
    return state["epoch"], list(state["history"])
