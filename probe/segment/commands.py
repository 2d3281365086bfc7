"""`probe segment ...`: thin click layer over probe.segment (registered by probe.cli)."""

from pathlib import Path

import click

from probe import options
from probe.segment import MODELS


def _names(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _data_option(f):
    return click.option("--data", "data_root", type=click.Path(path_type=Path), required=True,
                        help="CUB-200-2011 root folder (real or from `probe data synth`).")(f)


def _split_options(f):
    f = options.waterbirds(f)
    return click.option("--splits", default=None,
                        help="Comma-separated splits [default: train,test and waterbirds if its "
                             "folder exists].")(f)


def _run_options(f):
    f = options.device(f)
    f = click.option("--workers", default=2, type=options.NON_NEGATIVE_INT,
                     help="DataLoader worker processes decoding images.")(f)
    return click.option("--batch-size", type=options.COUNT, default=16, help="Images per forward pass.")(f)


def _backbone_options(f):
    f = click.option("--image-size", type=int, default=None,
                     help="Input side in pixels [default: the model's own, e.g. 518 for DINOv2, "
                          "384 for Mask2Former].")(f)
    f = options.random_init(f)
    return click.option("--weights", default=None,
                        help="Local weights: the backbone's file (safetensors / torch) for light "
                             "and unsupervised; a save_pretrained folder or hub id for "
                             "mask2former-swin-t.")(f)


@click.group(context_settings={"show_default": True})
def segment():
    """Foreground-background masks: train a segmenter on CUB annotations, predict mask folders
    (use them as --masks dir:PATH), measure their IoU, or derive masks without labels."""


@segment.command("train")
@_data_option
@click.option("--model", default="mask2former-swin-t",
              help="Segmentation model: " + "; ".join(f"{k} = {v}" for k, v in MODELS.items()))
@click.option("--backbone", default=None,
              help="Frozen backbone of --model light: a probe short name (vit_s, convnext_s, ...) "
                   "or any timm model name.")
@_backbone_options
@click.option("--epochs", type=options.COUNT, default=None,
              help="Training epochs [default: light 10, mask2former 50].")
@click.option("--batch-size", type=options.COUNT, default=None,
              help="Images per step [default: light 32, mask2former 16].")
@click.option("--lr", type=options.RATE, default=None, help="AdamW learning rate, cosine decay "
                                                     "[default: light 1e-3, mask2former 1e-4].")
@click.option("--weight-decay", type=options.NON_NEGATIVE, default=None,
              help="AdamW weight decay [default: light 1e-4, mask2former 0.05].")
@click.option("--hidden", default=128, type=options.COUNT, help="Width of the light model's decoder.")
@click.option("--seed", default=0, help="Seed of the initialisation, data order and flips.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Segmenter folder [default: segmenters/<model>[-<backbone>]].")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last epoch.")
@click.option("--workers", default=2, type=options.NON_NEGATIVE_INT,
              help="DataLoader worker processes decoding images.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              help="auto = cuda when available (bf16 autocast), else cpu.")
def train_command(data_root, model, backbone, weights, random_init, image_size, epochs, batch_size,
                  lr, weight_decay, hidden, seed, out, resume, workers, device):
    """Train a binary (background / bird) segmenter on CUB train images and their masks.

    A checkpoint is written after every epoch; interrupted? add --resume to the same command."""
    from probe.segment.train import train

    path = train(data_root, model=model, backbone=backbone, weights=weights,
                 random_init=random_init, image_size=image_size, out=out, epochs=epochs,
                 batch_size=batch_size, lr=lr, weight_decay=weight_decay, hidden=hidden,
                 seed=seed, workers=workers, device=device, resume=resume)
    click.echo(f"segmenter: {path}  (next: probe segment predict --model {path} --out masks/NAME)")


@segment.command("predict")
@_data_option
@click.option("--model", type=click.Path(path_type=Path), required=True,
              help="Segmenter folder written by `probe segment train`.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Mask folder to write, e.g. masks/m2f; use it as --masks dir:masks/m2f.")
@_split_options
@_run_options
def predict_command(data_root, model, out, splits, waterbirds, batch_size, workers, device):
    """Write one 0/255 PNG mask per image at its original size, mirroring images/ (Waterbirds
    masks under OUT/waterbirds/). Interrupted? Run it again: existing masks are kept."""
    from probe.segment.predict import predict

    path = predict(data_root, model, out, splits=_names(splits), waterbirds_root=waterbirds,
                   batch_size=batch_size, workers=workers, device=device)
    click.echo(f"masks: {path}  (use --masks dir:{path})")


@segment.command("eval")
@_data_option
@click.option("--masks", multiple=True, required=True,
              help="Mask source to score: dir:PATH (or gt); repeat to compare several.")
@_split_options
@click.option("--workers", default=2, type=options.NON_NEGATIVE_INT,
              help="DataLoader worker processes decoding masks.")
def eval_command(data_root, masks, splits, waterbirds, workers):
    """Mean IoU (of background and bird IoUs) and bird IoU against the CUB annotations, per split,
    over pixel totals and per image (%). Waterbirds masks are scored on the CUB annotation."""
    from probe.segment.evaluate import evaluate

    head = ("masks", "split", "images", "mIoU", "fg IoU", "mIoU/img", "fg IoU/img")
    rows = []
    for source in masks:
        for split, r in evaluate(data_root, source, splits=_names(splits),
                                 waterbirds_root=waterbirds, workers=workers).items():
            rows.append((source, split, r["n"], *(f"{r[k]:.1f}" for k in
                         ("miou", "fg_iou", "miou_per_image", "fg_iou_per_image"))))
    width = max(len(head[0]), *(len(r[0]) for r in rows))
    for row in [head, *rows]:
        click.echo(f"{row[0]:<{width}}  {row[1]:<10}" + "".join(f"{v:>11}" for v in row[2:]))


@segment.command("unsupervised")
@click.option("--backbone", required=True,
              help="Frozen backbone whose features make the masks, e.g. vit_b (DINOv2).")
@_data_option
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Mask folder to write, e.g. masks/pca-vit_b.")
@click.option("--method", type=click.Choice(["pca", "cls-attention"]), default="pca",
              help="pca: first principal component of each image's patch tokens, the side nearer "
                   "the centre is the bird; cls-attention: ViT CLS attention above its mean.")
@_backbone_options
@_split_options
@_run_options
def unsupervised_command(backbone, data_root, out, method, weights, random_init, image_size,
                         splits, waterbirds, batch_size, workers, device):
    """Masks without any segmentation label, from a frozen backbone's own features; same folder
    layout as predict. Score them with `probe segment eval`."""
    from probe.segment.unsupervised import unsupervised

    path = unsupervised(backbone, data_root, out, method=method, weights=weights,
                        random_init=random_init, image_size=image_size, splits=_names(splits),
                        waterbirds_root=waterbirds, batch_size=batch_size, workers=workers,
                        device=device)
    click.echo(f"masks: {path}  (use --masks dir:{path})")
