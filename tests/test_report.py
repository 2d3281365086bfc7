"""The study's grid (experiments.py) and reports built from hand-made run records."""

import math
import time

import pandas as pd
import pytest
from PIL import Image

from probe.errors import ProbeError
from probe.experiments import paper_numbers, plan, table_cells
from probe.report import build_report
from probe.results import write_record


def add(results, backbone, strategy, metrics, representation="cls+patch", regime="frozen",
        stage=None, seed=0, **overrides):
    """Write a record; ``metrics`` maps "<eval set>/<test input>" to top-1."""
    config = dict(dataset="cub", backbone=backbone, regime=regime, strategy=strategy,
                  stage=stage, representation=representation, pooling="mean", mask_source="gt",
                  fg_rule="seed" if strategy == "late" else None,
                  train_input="masked" if strategy == "early" else "original",
                  classifier="linear", recipe="paper", views=0, seed=seed) | overrides
    write_record({"kind": "fit" if regime == "frozen" else "finetune", "config": config,
                  "metrics": {k: {"top1": v, "mean_per_class": v - 1, "n": 5794}
                              for k, v in metrics.items()}}, results)


BOTH = ("cub/original", "cub/masked", "waterbirds/original", "waterbirds/masked")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    results = root / "results"
    add(results, "vit_b", "baseline", dict(zip(BOTH, (89.0, 87.0, 76.0, 83.0))))
    for seed, masked in ((0, 90.0), (1, 91.0)):  # two seeds of one fit
        add(results, "vit_b", "early", dict(zip(BOTH, (88.0, masked, 82.0, masked - 3))), seed=seed)
    add(results, "vit_b", "late", {"cub/original": 88.5, "waterbirds/original": 77.0}, stage="L")
    add(results, "convnext_b", "late", {"cub/original": 89.0, "waterbirds/original": 80.5},
        representation="patch", regime="finetuned", stage="L-1")
    add(results, "my_vit", "baseline", {"cub/original": 80.0, "waterbirds/original": 60.0})
    add(results, "my_vit", "baseline", {"cub/original": 81.0, "waterbirds/original": 61.0},
        classifier="logreg")
    add(results, "tiny", "baseline", {"cub/original": 70.0, "waterbirds/original": 40.0},
        representation="patch", dataset="synth")
    add(results, "vit_b", "late", {"cub/original": 1.0}, stage="L-1")  # in no table
    result = build_report(results, out=root / "reports")
    return root / "reports", result


def test_shipped_paper_numbers_match_the_study():
    paper = paper_numbers()
    assert len(paper) == 126

    def top1(**cell):
        rows = paper.loc[(paper[list(cell)] == pd.Series(cell)).all(axis=1), "top1"]
        assert len(rows) == 1, cell
        return rows.iloc[0]
    s = dict(table=3, backbone="convnext_s", strategy="baseline")
    assert [top1(**s, test_input=t, dataset=d) for d in ("cub", "waterbirds")
            for t in ("original", "masked")] == [86.56, 78.60, 55.82, 67.12]
    # Read off study.txt: Table 3 ViT-L masked/masked Waterbirds, Table 4 ViT-B late
    # fine-tuned Waterbirds, Table 5 ConvNeXt-L L-1 Waterbirds, Table 6 patch baseline frozen.
    assert top1(table=3, backbone="vit_l", strategy="early", test_input="masked",
                dataset="waterbirds") == 88.30
    assert top1(table=4, backbone="vit_b", strategy="late", regime="finetuned",
                dataset="waterbirds") == 74.76
    assert top1(table=5, backbone="convnext_l", stage="L-1", dataset="waterbirds") == 79.68
    assert top1(table=6, strategy="baseline", representation="patch", regime="frozen",
                dataset="waterbirds") == 24.71


def test_plan_shares_fits_between_tables():
    # Table 6 (3 representations x 3 strategies) holds every vit_b fit of Tables 3 and 4.
    dumps, fits, finetunes = plan((3, 4, 6), ["vit_b"])
    assert len(fits) == 9 and len(finetunes) == 9
    assert dumps == [dict(backbone="vit_b", input=i, masks="gt", taps=("L",))
                     for i in ("original", "masked")]
    late = dict(backbone="vit_b", head="cls+patch", mask="late", stage="L", mask_source="gt")
    assert late in fits
    assert plan((3, 4, 6), ["vit_b"], frozen_only=True) == (dumps, fits, [])
    # Table 3 alone: baseline and early; the baseline is also tested on masked images.
    assert [f["mask"] for f in plan((3,), ["vit_b"])[1]] == ["none", "early"]


def test_plan_for_table5_and_own_backbones():
    dumps, fits, finetunes = plan((5,), ["convnext_b"])
    assert dumps[0] == dict(backbone="convnext_b", input="original", masks="gt",
                        taps=("L", "L.from-masked-L-1"))
    # The study fine-tuned L, L-1 and 0 (early); each also has its frozen counterpart.
    assert [(f["mask"], f["stage"]) for f in fits] == \
        [("late", "L"), ("late", "L-1"), ("early", "L")]
    assert finetunes == fits
    assert all(f["head"] == "patch" for f in fits + finetunes)
    # A user's ViT follows ViT-B's rows (none in Table 5); a CNN follows ConvNeXt-B's.
    assert plan((5,), ["my_vit"]) == ([], [], [])
    cells = table_cells(4, ["my_cnn"], kind_of=lambda name: "convnext")
    assert len(cells) == 12 and {c.representation for c in cells} == {"gap"}
    with pytest.raises(ProbeError, match="table"):
        table_cells(7)


def test_numbers_land_in_their_cells(report):
    folder, _ = report
    t3 = pd.read_csv(folder / "table3-cub.csv")
    vit = t3[(t3.backbone == "vit_b") & (t3.strategy == "Masked")].iloc[0]
    col = "CUB / test on masked"
    assert (vit[f"{col}: ours"], vit[f"{col}: n"], vit[f"{col}: paper"]) == (90.5, 2, 90.10)
    assert vit[f"{col}: diff"] == pytest.approx(0.40)
    assert vit["Waterbirds / test on original: ours"] == 82.0
    base = t3[(t3.backbone == "vit_b") & (t3.strategy == "Baseline")].iloc[0]
    assert base["Waterbirds / test on masked: diff"] == pytest.approx(0.0)
    # Missing cells stay missing, paper values stay visible.
    cnx = t3[(t3.backbone == "convnext_s") & (t3.strategy == "Baseline")].iloc[0]
    assert math.isnan(cnx["CUB / test on original: ours"])
    assert cnx["CUB / test on original: paper"] == 86.56
    # A user's backbone: own rows, no paper number, logreg not mixed in.
    mine = t3[(t3.backbone == "my_vit") & (t3.strategy == "Baseline")].iloc[0]
    assert mine["CUB / test on original: ours"] == 80.0
    assert math.isnan(mine["CUB / test on original: paper"])
    t4 = pd.read_csv(folder / "table4-cub.csv")
    late = t4[(t4.backbone == "vit_b") & (t4.strategy == "Late-Masked")].iloc[0]
    assert late["Waterbirds / frozen: ours"] == 77.0
    assert late["Waterbirds / frozen: diff"] == pytest.approx(77.0 - 76.55)
    assert math.isnan(late["Waterbirds / fine-tuned: ours"])
    t5 = pd.read_csv(folder / "table5-cub.csv")
    lm1 = t5[(t5.backbone == "convnext_b") & (t5.stage == "L-1")].iloc[0]
    assert (lm1["Waterbirds / fine-tuned: ours"], lm1["Waterbirds / fine-tuned: paper"]) == \
        (80.5, 80.04)


def test_markdown_marks_seeds_missing_cells_and_dataset(report):
    folder, result = report
    md = (folder / "table3-cub.md").read_text()
    assert "| ViT-B | Masked |" in md and "90.50 (n=2) / 90.10 (+0.40)" in md
    assert "| ConvNeXt-S | Baseline | — / 86.56 |" in md
    assert "| my_vit | Baseline | 80.00 / — |" in md
    assert "(n=k) is the mean over k records" in md and "dataset `cub`" in md
    assert result.headline == (folder / "table4-cub.md").read_text()


def test_other_datasets_and_variants_get_their_own_tables(report):
    folder, _ = report
    logreg = pd.read_csv(folder / "table4-cub-classifier-logreg.csv")
    assert list(logreg.backbone.unique()) == ["my_vit"]
    assert logreg.loc[logreg.strategy == "Baseline", "Waterbirds / frozen: ours"].item() == 61.0
    synth = folder / "table4-synth.md"
    assert "dataset `synth`" in synth.read_text() and "(+" not in synth.read_text()
    diffs = pd.read_csv(folder / "table4-synth.csv").filter(like=": diff")
    assert diffs.isna().all().all()


def test_every_file_exists_and_plots_are_images(report):
    folder, result = report
    assert all(p.exists() for p in result.files)
    pngs = [p for p in result.files if p.suffix == ".png"]
    assert {p.name for p in pngs} >= {f"table{t}-cub.png" for t in (3, 4, 5, 6)}
    for png in pngs:
        with Image.open(png) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 100


def test_summary_reports_claims_and_unplaced_records(report):
    folder, result = report
    assert result.summary == (folder / "summary.md").read_text()
    main = result.summary.split("## Findings")[1]
    assert "**supported** — Early masking gives the best out-of-distribution" in main
    assert "the study's settings; frozen cells from features computed once (K = 0)" in main
    assert "ViT-B frozen: Baseline 76.00, Early-Masked 87.50, Late-Masked 77.00 → yes" in main
    assert "**not enough records** — Patch tokens with early masking" in main
    assert "1 record(s) in no table shown" in result.summary
    # one logreg baseline can check nothing: one line instead of every claim unchecked
    logreg = next(part for part in result.summary.split("## Findings") if "logreg" in part)
    assert logreg.strip().endswith("too few records to check any of the study's claims.")
    assert "not enough records" not in logreg


def test_findings_flip_with_the_numbers(tmp_path):
    results = tmp_path / "results"
    add(results, "vit_b", "baseline", {"cub/original": 89.0, "waterbirds/original": 76.0})
    add(results, "vit_b", "late", {"cub/original": 88.0, "waterbirds/original": 78.0}, stage="L")
    claim = "— Late masking beats the baseline out of distribution"
    before = build_report(results, tables=(4,), out=tmp_path / "a").summary
    assert f"**supported** {claim}" in before
    add(results, "vit_b", "late", {"cub/original": 88.0, "waterbirds/original": 70.0}, stage="L")
    after = build_report(results, tables=(4,), out=tmp_path / "b").summary
    assert f"**contradicted** {claim}" in after and "Late-Masked 70.00 → no" in after


def test_empty_results_still_show_the_study(tmp_path):
    result = build_report(tmp_path / "none", tables=(4,), out=tmp_path / "out")
    t4 = pd.read_csv(tmp_path / "out" / "table4-cub.csv")
    assert t4.filter(like=": ours").isna().all().all()
    assert t4.filter(like=": paper").notna().sum().sum() == 24
    assert "No run records in" in result.summary and "not enough records" not in result.summary
    with pytest.raises(ProbeError, match="no such table"):
        build_report(tmp_path / "none", tables=(2,), out=tmp_path / "out")


def test_a_newer_setting_of_a_cell_replaces_the_older_instead_of_averaging(tmp_path):
    results = tmp_path / "results"
    add(results, "convnext_b", "baseline", {"cub/original": 70.0}, representation="patch",
        stores={"original": "old-store"})
    time.sleep(0.01)  # records are ordered by their creation time
    add(results, "convnext_b", "baseline", {"cub/original": 90.0}, representation="patch",
        stores={"original": "rebuilt-store"}, seed=0)
    add(results, "convnext_b", "baseline", {"cub/original": 80.0}, representation="patch",
        stores={"original": "rebuilt-store"}, seed=1)
    result = build_report(results, tables=(4,), out=tmp_path / "out")
    t4 = pd.read_csv(tmp_path / "out" / "table4-cub.csv")
    row = t4[(t4.iloc[:, 0] == "convnext_b") & (t4.iloc[:, 1] == "Baseline")].iloc[0]
    assert row["CUB / frozen: ours"] == pytest.approx(85.0)  # the two seeds of the newer setting
    assert row["CUB / frozen: n"] == 2
    assert "superseded" in result.summary


def test_mask_source_filter_takes_a_name_or_a_folder_spec(tmp_path):
    results = tmp_path / "results"
    add(results, "vit_b", "baseline", {"cub/original": 89.0, "waterbirds/original": 76.0})
    add(results, "vit_b", "early", {"cub/masked": 80.0, "waterbirds/masked": 70.0},
        mask_source="m2f")
    add(results, "vit_b", "early", {"cub/masked": 60.0, "waterbirds/masked": 50.0},
        mask_source="pca")
    for spec in ("m2f", f"dir:{tmp_path / 'masks' / 'm2f'}"):
        result = build_report(results, tables=(4,), out=tmp_path / "out", mask_source=spec)
        table = pd.read_csv(tmp_path / "out" / "table4-cub.csv")
        early = table.loc[(table.backbone == "vit_b") & (table.strategy == "Early-Masked")]
        assert early["Waterbirds / frozen: ours"].item() == 70.0, spec
        assert "mask source `m2f`" in result.summary
