"""The `probe` command. It only parses options and calls the Python API, which is the real interface."""

import sys
from pathlib import Path

import click

from probe.errors import ProbeError


class ProbeGroup(click.Group):
    """Shows user errors as one clear line instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ProbeError as err:
            click.secho(f"error: {err}", fg="red", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("\ninterrupted; run the same command again to resume", err=True)
            sys.exit(130)


@click.group(cls=ProbeGroup, context_settings={"help_option_names": ["-h", "--help"],
                                               "show_default": True})
@click.version_option(package_name="masking-probe")
def main():
    """Background-bias experiments on frozen vision backbones (early and late masking).

    Typical flow: `probe data synth` (or use real CUB-200-2011) -> `probe dump` -> `probe fit`
    -> `probe report`.
    """


@main.group()
def data():
    """Create and validate datasets in the CUB-200-2011 layout."""


@data.command("synth")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder to write the synthetic dataset into (CUB layout + Waterbirds copy).")
@click.option("--classes", default=20, help="Number of bird classes.")
@click.option("--per-class", default=24, help="Images per class (about half train, half test).")
@click.option("--size", default=128, help="Image side in pixels.")
@click.option("--seed", default=0, help="Random seed; the same seed gives identical files.")
def data_synth(out, classes, per_class, size, seed):
    """Write a synthetic fine-grained bird set with habitat backgrounds and a swapped-background
    (Waterbirds-style) copy, in exactly the CUB-200-2011 layout."""
    from probe.data.synth import make_synthetic

    root = make_synthetic(out, classes=classes, per_class=per_class, size=size, seed=seed)
    click.echo(f"wrote synthetic dataset to {root}")


@data.command("check")
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--waterbirds", type=click.Path(path_type=Path), default=None,
              help="Waterbirds folder [default: ROOT/waterbird_complete95_forest2water2 if present].")
@click.option("--masks", default="gt", help="Mask source to check: gt, dir:PATH or none.")
@click.option("--no-decode", is_flag=True, help="Only check that files exist (faster).")
def data_check(root, waterbirds, masks, no_decode):
    """Validate a dataset root: counts per split, classes, masks, image sizes and every problem.

    Exits with status 1 if any problem was found."""
    from probe.data.check import check_dataset

    report = check_dataset(root, waterbirds, masks=masks, decode=not no_decode)
    click.echo("\n".join(report.lines()))
    sys.exit(0 if report.ok else 1)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@main.command()
@click.option("--backbone", required=False,
              help="Registry short name (vit_s/b/l, vit_*_reg, convnext_s/b/l), any timm model name, "
                   "or hf:<hub id or folder>. See `probe backbones`.")
@click.option("--data", "data_root", type=click.Path(path_type=Path), required=False,
              help="CUB-200-2011 root folder (real or from `probe data synth`).")
@click.option("--input", "input_", type=click.Choice(["original", "masked"]), default="original",
              help="masked = early masking: background pixels blacked out before the backbone.")
@click.option("--masks", default="gt",
              help="Mask source: gt (CUB segmentations), dir:PATH (predicted PNG masks), or none. "
                   "Used for early masking and for the per-cell foreground maps of late masking.")
@click.option("--splits", default=None,
              help="Comma-separated splits [default: train,test and waterbirds if its folder exists].")
@click.option("--taps", default="L",
              help="Comma-separated feature maps to keep: L (last stage), L-1 (second-to-last), "
                   "L.from-masked-L-1 (last stage recomputed from the background-zeroed L-1 map).")
@click.option("--waterbirds", type=click.Path(path_type=Path), default=None,
              help="Waterbirds folder [default: DATA/waterbird_complete95_forest2water2].")
@click.option("--dataset", default=None,
              help="Dataset name in the store path [default: cub for CUB_200_2011, else DATA's name].")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="Local weights file (safetensors or torch checkpoint) instead of the timm tag.")
@click.option("--random-init", is_flag=True, help="Random weights (tests, demos, no network).")
@click.option("--image-size", type=int, default=None,
              help="Input side in pixels [default: the backbone's, 518 for DINOv2, 224 for ConvNeXt].")
@click.option("--batch-size", default=64, help="Images per forward pass.")
@click.option("--workers", default=2, help="DataLoader worker processes decoding images.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              help="auto = cuda when available (bf16 autocast), else cpu (fp32).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("features"),
              help="Root folder of feature stores.")
@click.option("--overwrite", is_flag=True, help="Replace a store built with another configuration.")
@click.option("--chunk-rows", type=int, default=None,
              help="Images per Zarr chunk (the unit of resuming and of torchrun work sharing) "
                   "[default: about 16 MiB of the widest array].")
@click.option("--add-masks", default=None, metavar="SOURCE",
              help="Only add the foreground maps of another mask source (dir:PATH) to the existing "
                   "store of --backbone/--input; no features are recomputed.")
def dump(backbone, data_root, input_, masks, splits, taps, waterbirds, dataset, weights, random_init,
         image_size, batch_size, workers, device, out, overwrite, chunk_rows, add_masks):
    """Run a frozen backbone once per image and store its spatial features (Zarr).

    Writes OUT/<dataset>/<backbone>/<input>.zarr. Interrupted? Run the same command again: it
    resumes from the last completed chunk. Multi-GPU: launch it with `torchrun --nproc_per_node N`.
    """
    from probe import dump as api

    if not backbone or not data_root:
        raise click.UsageError("--backbone and --data are required")
    if add_masks:
        name = api.input_name(input_, api.MaskSource.parse(masks))
        path = api.store_path(out, dataset or api.default_dataset_name(data_root), backbone, name)
        api.add_masks(path, data_root, add_masks, waterbirds_root=waterbirds,
                      batch_size=batch_size, workers=workers)
    else:
        path = api.dump(backbone, data_root, input=input_, masks=masks,
                        splits=_csv(splits) if splits else None, taps=_csv(taps), out=out,
                        dataset=dataset, waterbirds_root=waterbirds, weights=weights,
                        random_init=random_init, image_size=image_size, batch_size=batch_size,
                        workers=workers, device=device, overwrite=overwrite,
                        chunk_rows=chunk_rows)
    click.echo(f"feature store: {path}")
