"""The `probe` command. It only parses options and calls the Python API, which is the real interface."""

import sys
from pathlib import Path

import click

from probe import options
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


@main.command("backbones")
def backbones_command():
    """List the registry's short names (any timm model name or hf:<hub id> works too)."""
    from probe.backbones import list_backbones

    for name, description in list_backbones().items():
        click.echo(f"{name:<12} {description}")
    click.echo("\nAlso: any timm model name (e.g. test_vit, resnet50) or hf:<hub id or folder>.")


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
@options.waterbirds
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
@click.option("--backbone", required=True,
              help="Registry short name (vit_s/b/l, vit_*_reg, convnext_s/b/l), any timm model name, "
                   "or hf:<hub id or folder>. See `probe backbones`.")
@click.option("--data", "data_root", type=click.Path(path_type=Path), required=True,
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
@options.waterbirds
@options.dataset
@options.weights
@options.random_init
@options.image_size
@click.option("--batch-size", default=64, type=options.COUNT, help="Images per forward pass.")
@click.option("--workers", default=2, type=options.NON_NEGATIVE_INT,
              help="DataLoader worker processes decoding images.")
@options.device
@click.option("--out", type=click.Path(path_type=Path), default=Path("features"),
              help="Root folder of feature stores.")
@click.option("--overwrite", is_flag=True, help="Replace a store built with another configuration.")
@click.option("--chunk-rows", type=options.COUNT, default=None,
              help="Images per Zarr chunk (the unit of resuming and of torchrun work sharing) "
                   "[default: about 16 MiB of the widest array].")
@click.option("--views", default=0, type=options.NON_NEGATIVE_INT,
              help="Also store this many augmented views of every train image (split train.aug), "
                   "made with the study's frozen-recipe training transform; masks follow the "
                   "geometry. Approximates the study's on-line augmentation (`probe fit --views`).")
@click.option("--add-masks", default=None, metavar="SOURCE",
              help="Only add the foreground maps of another mask source (dir:PATH) to the existing "
                   "store of --backbone/--input; no features are recomputed.")
def dump(backbone, data_root, input_, masks, splits, taps, waterbirds, dataset, weights, random_init,
         image_size, batch_size, workers, device, out, overwrite, chunk_rows, views, add_masks):
    """Run a frozen backbone once per image and store its spatial features (Zarr).

    Writes OUT/<dataset>/<backbone>/<input>.zarr. Interrupted? Run the same command again: it
    resumes from the last completed chunk. Multi-GPU: launch it with `torchrun --nproc_per_node N`.
    """
    from probe import dump as api

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
                        chunk_rows=chunk_rows, views=views)
    click.echo(f"feature store: {path}")


def _print_metrics(record: dict) -> None:
    rows = [("eval set", "top-1", "mean/class", "worst group", "n")]
    for name, m in record["metrics"].items():
        worst = m.get("worst_group")
        rows.append((name, f"{m['top1']:.2f}", f"{m['mean_per_class']:.2f}",
                     "" if worst is None else f"{worst:.2f}", str(m["n"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))


@main.command("fit")
@click.option("--backbone", required=True, help="Backbone whose feature stores to use.")
@click.option("--head", default="auto",
              type=click.Choice(["auto", "cls", "patch", "cls+patch"]),
              help="Head input: CLS token, GAP of patch tokens, or both concatenated. auto = "
                   "cls+patch when the model has a CLS token (the study's ViT default), else patch (GAP).")
@click.option("--mask", type=click.Choice(["none", "early", "late"]), default="none",
              help="none = baseline; early = train on the masked-input store; late = zero "
                   "background cells of the feature map before pooling.")
@click.option("--stage", type=click.Choice(["L", "L-1"]), default="L",
              help="Late masking after the last stage (L) or after the second-to-last (L-1).")
@click.option("--mask-source", default="gt",
              help="Mask source of the stores: gt, dir:PATH (as given to `probe dump --masks`) or "
                   "its short name (the folder's name).")
@click.option("--fg-rule", type=click.Choice(["seed", "area"]), default="seed",
              help="Which cells are background: seed = the study's nearest-exact resize of the "
                   "binary mask; area = area fraction of bird below --fg-threshold.")
@click.option("--fg-threshold", default=0.5, help="Area-fraction threshold for --fg-rule area.")
@click.option("--pooling", type=click.Choice(["mean", "fgmean", "bg"]), default="mean",
              help="mean = the study's pooling; fgmean = mean over foreground cells only; "
                   "bg = foreground zeroed (what the background alone predicts).")
@click.option("--classifier", type=click.Choice(["linear", "logreg", "knn"]), default="linear",
              help="linear = softmax head (torch); logreg = scikit-learn L-BFGS, C chosen on val; "
                   "knn = faiss cosine kNN, k chosen on val.")
@click.option("--recipe", type=click.Choice(["paper", "sweep"]), default="paper",
              help="Linear head: paper = the study's frozen recipe; sweep = a grid of lr x weight "
                   "decay trained as one batched model, chosen on val.")
@click.option("--views", default=0, type=options.NON_NEGATIVE_INT,
              help="Also train on this many stored augmented views per image.")
@click.option("--seed", default=0, help="Seed of the head's initialisation and batch order.")
@options.features
@click.option("--dataset", default=None, help="Dataset name in the store path [default: inferred].")
@click.option("--data", "data_root", type=click.Path(path_type=Path), default=None,
              help="Dataset root (only to name the dataset and print dump commands).")
@options.results
@options.device
@click.option("--force", is_flag=True, help="Refit even if an identical record exists.")
def fit_command(backbone, head, mask, stage, mask_source, fg_rule, fg_threshold, pooling,
                classifier, recipe, views, seed, features, dataset, data_root, results, device,
                force):
    """Fit a head on stored features and evaluate it on every evaluation set present.

    Reads the stores of `probe dump`; writes one run record (JSON) to RESULTS/runs/.
    """
    from probe.fit import fit

    record = fit(backbone, features=features, dataset=dataset, data_root=data_root, head=head,
                 mask=mask, stage=stage, mask_source=mask_source, fg_rule=fg_rule,
                 fg_threshold=fg_threshold, pooling=pooling, classifier=classifier,
                 recipe=recipe, views=views, seed=seed, results=results, force=force,
                 device=device)
    note = " (identical fit found; --force refits)" if record.get("reused") else ""
    click.echo(f"record {record['id']}{note}: {Path(results) / 'runs' / (record['id'] + '.json')}")
    _print_metrics(record)


def _tables(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in _csv(value))
    except ValueError:
        raise click.BadParameter(f"expected table numbers like 3,4,5,6, got {value!r}") from None


@main.command("run")
@click.option("--tables", default="3,4,5,6", help="Comma-separated tables of the study to fill.")
@click.option("--backbones", default=None,
              help="Comma-separated backbones [default: the ones each table uses in the study].")
@click.option("--data", "data_root", type=click.Path(path_type=Path), required=True,
              help="CUB-200-2011 root folder.")
@click.option("--frozen-only", is_flag=True, help="Skip the fine-tuned cells (no `probe finetune`).")
@click.option("--masks", default="gt", help="Mask source for early and late masking.")
@options.features
@options.results
@options.weights
@options.random_init
@options.image_size
@click.option("--batch-size", default=64, type=options.COUNT,
              help="Images per forward pass when dumping.")
@click.option("--workers", default=2, type=options.NON_NEGATIVE_INT, help="DataLoader workers when dumping.")
@options.waterbirds
@options.dataset
@options.device
def run_command(tables, backbones, data_root, frozen_only, masks, features, results, weights,
                random_init, image_size, batch_size, workers, waterbirds, dataset, device):
    """Run every missing dump, fit and fine-tune the study's tables need; skip what exists.

    Interrupted? Run the same command again: finished steps are reused, a dump resumes.
    """
    from probe.run import run

    counts = run(_tables(tables), _csv(backbones) if backbones else None, data_root=data_root,
                 features=features, results=results, frozen_only=frozen_only, mask_source=masks,
                 random_init=random_init, weights=weights, image_size=image_size,
                 batch_size=batch_size, workers=workers, waterbirds_root=waterbirds,
                 dataset=dataset, device=device)
    new = counts["new_fits"] + counts["new_finetunes"]
    click.echo(f"{counts['dumps']} stores, {counts['fits']} fits ({counts['new_fits']} new), "
               f"{counts['finetunes']} fine-tunes ({counts['new_finetunes']} new)"
               + ("" if new else ": nothing to do, every record already exists"))
    click.echo(f"next: probe report --results {results}")


@main.command("report")
@click.option("--tables", default="3,4,5,6", help="Comma-separated tables of the study.")
@options.results
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports"),
              help="Folder for the CSV, Markdown and PNG files.")
@click.option("--mask-source", default=None, help="Only records of this mask source [default: all].")
def report_command(tables, results, out, mask_source):
    """Tables 3-6 in the study's layout from run records, with the study's numbers beside ours.

    Never trains: cells without a record are marked missing.
    """
    from probe.report import build_report

    report = build_report(results, _tables(tables), out, mask_source)
    click.echo(report.headline)
    click.echo(f"\n{report.summary}\n\nwrote {len(report.files)} files to {out}")


@main.command("demo")
@click.option("--out", type=click.Path(path_type=Path), default=Path("probe-demo"),
              help="Folder that keeps everything: data, features, records, report.")
@click.option("--classes", default=20, help="Synthetic bird classes.")
@click.option("--per-class", default=24, help="Synthetic images per class.")
@click.option("--size", default=128, help="Image side and backbone input size in pixels.")
def demo_command(out, classes, per_class, size):
    """The whole study on a synthetic set with two tiny random-init backbones (no network).

    Generates the data, dumps features, fits the frozen cells of Tables 3-6 and writes the report.
    """
    from probe.run import demo

    result = demo(out, classes=classes, per_class=per_class, size=size)
    click.echo(result["report"].headline)
    click.echo(f"\n{result['report'].summary}")
    click.echo(f"\nreport: {Path(out) / 'reports' / 'report.md'} (tables as CSV/Markdown/PNG "
               f"beside it); took {result['seconds']:.0f} s")



# Verbs that live with their own package; their modules import only click at the top level.
from probe.finetune.commands import finetune  # noqa: E402
from probe.segment.commands import segment  # noqa: E402

main.add_command(finetune)
main.add_command(segment)
