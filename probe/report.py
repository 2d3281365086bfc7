"""Tables (CSV + Markdown), plots (PNG) and a findings summary from run records.

Only reads records (``probe.results.load_records``); never trains. Decisions:

- Every table is written in the study's row/column layout, our number beside the
  study's, with the difference (ours - study) wherever both exist. Cells without
  a record stay missing: empty in the CSV (so its value columns stay numeric),
  "—" in Markdown. Several records of one cell (seeds) are averaged and counted.
- Records are split into *sections*, one set of tables each, named by the
  training data, the mask source (only when a dataset has several) and the
  *variant*: the pooling, classifier, recipe, augmented views and fg rule that
  differ from the study's protocol (mean pooling, linear head, paper recipe, 0
  views, the seed's mask rule). So a logreg or fgmean run never mixes silently
  into a paper cell; it gets its own tables. Records without a mask source
  (baselines) join every mask source's section of their dataset.
- Differences are computed only for like-for-like sections (dataset "cub", the
  study's protocol); elsewhere the study's number is shown for reference only.
- Backbones the study did not use get their own rows in the layout of their kind
  (ViT-B's rows for a ViT, ConvNeXt-B's otherwise); the study column shows "—".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from probe.data.masks import mask_name
from probe.errors import ProbeError
from probe.experiments import (
    CLAIMS,
    PAPER_DATASET,
    RECORD_KEYS,
    Cell,
    Claim,
    default_kind_of,
    paper_numbers,
    table_cells,
)
from probe.results import load_records

_CELL = [f.name for f in fields(Cell)]
_KEY = [f"r_{k}" for k in RECORD_KEYS]  # prefixed: the cells' own fields share these names
_DEFAULTS = {"pooling": "mean", "classifier": "linear", "recipe": "paper", "views": 0,
             "fg_rule": "seed"}
_ORDER = ["cub", "waterbirds", "frozen", "finetuned", "original", "masked"]  # column order
_LABELS = {
    "backbone": {"convnext_s": "ConvNeXt-S", "convnext_b": "ConvNeXt-B", "convnext_l": "ConvNeXt-L",
                 "vit_s": "ViT-S", "vit_b": "ViT-B", "vit_l": "ViT-L"},
    "strategy": {"baseline": "Baseline", "early": "Early-Masked", "late": "Late-Masked"},
    "representation": {"cls": "CLS", "patch": "Patch", "cls+patch": "CLS+Patch", "gap": "GAP"},
    "dataset": {"cub": "CUB", "waterbirds": "Waterbirds"},
    "regime": {"frozen": "frozen", "finetuned": "fine-tuned"},
    "test_input": {"original": "test on original", "masked": "test on masked"},
}
_HEADERS = {"backbone": "Backbone", "strategy": "Training on CUB", "stage": "Feature masking",
            "representation": "ViT representation"}


@dataclass(frozen=True)
class Layout:
    title: str
    rows: tuple[str, ...]  # Cell fields naming a row, backbone first
    cols: tuple[str, ...]  # Cell fields naming a column, dataset first
    labels: dict = field(default_factory=dict)  # this table's own labels, e.g. "Masked"


LAYOUTS = {
    3: Layout("Table 3: early masking vs baseline (frozen backbone)", ("backbone", "strategy"),
              ("dataset", "test_input"), {"strategy": {"early": "Masked"}}),
    4: Layout("Table 4: baseline vs early vs late masking, frozen vs fine-tuned",
              ("backbone", "strategy"), ("dataset", "regime")),
    5: Layout("Table 5: masking after the last stage (L), the second last (L-1) or the image (0)"
              " (the study fine-tuned only)", ("backbone", "stage"), ("dataset", "regime")),
    6: Layout("Table 6: ViT representation", ("backbone", "strategy", "representation"),
              ("dataset", "regime")),
}


def _join(layout: Layout, names: Iterable[str], values: Iterable, sep: str = " ") -> str:
    return sep.join(layout.labels.get(n, {}).get(v) or _LABELS.get(n, {}).get(v, v)
                    for n, v in zip(names, values))


@dataclass
class Section:
    """The records of one dataset / mask source / protocol variant, reported together."""

    data: str
    mask_source: str | None
    variant: str  # "" for the study's protocol
    records: pd.DataFrame
    slug: str  # file-name part

    @property
    def compare(self) -> bool:
        return self.data == PAPER_DATASET and not self.variant

    def describe(self) -> str:
        mask = f", mask source `{self.mask_source}`" if self.mask_source else ""
        variant = f"variant {self.variant}" if self.variant else "the study's settings"
        if not self.variant and (self.records.r_regime == "frozen").any():
            variant += ("; frozen cells from features computed once (K = 0), where the study "
                        "augmented every image anew each epoch")
        n = self.records.record_id.nunique()
        return f"Records: dataset `{self.data}`{mask}, {variant} ({n} record{'s' * (n != 1)})"


@dataclass
class ReportResult:
    files: list[Path]  # every file written
    headline: str      # Markdown of Table 4, else of the first table with records
    summary: str       # the findings (Markdown), also in summary.md


def _normalise(records: pd.DataFrame) -> pd.DataFrame:
    frame = records.copy()
    for column, default in {**_DEFAULTS, "data": "unknown"}.items():
        frame[column] = frame[column].astype(object).where(frame[column].notna(), default)
    frame["representation"] = frame["representation"].replace({"gap": "patch"})  # paper's name
    # The stage only means something for late masking (records say null otherwise).
    frame["stage"] = frame["stage"].where(frame["strategy"] == "late", "").fillna("")
    frame["variant"] = [", ".join(f"{k}={r[k]}" for k in _DEFAULTS if r[k] != _DEFAULTS[k])
                        for r in frame[list(_DEFAULTS)].to_dict("records")]
    return frame.rename(columns={k[2:]: k for k in _KEY})


def _sections(records: pd.DataFrame, mask_source: str | None) -> list[Section]:
    if mask_source is not None:
        records = records[records.mask_source.isna() | (records.mask_source == mask_source)]
    groups = dict(list(records.groupby(["data", "variant"])))
    groups.setdefault((PAPER_DATASET, ""), records.iloc[:0])  # the study's tables always exist
    sections = []
    for (data, variant), part in groups.items():
        sources = sorted(part.mask_source.dropna().unique()) or [mask_source]
        for source in sources:
            several = len(sources) > 1
            own = part[part.mask_source.isna() | (part.mask_source == source)] if several else part
            name = "-".join([data] + ([source] if several else []) + [variant])
            slug = re.sub(r"[^A-Za-z0-9._]+", "-", name).strip("-")
            sections.append(Section(data, source, variant, own, slug))
    return sorted(sections, key=lambda s: (not s.compare, s.slug))  # like-for-like first


def _cell_values(records: pd.DataFrame, table: int, backbones: Sequence[str],
                 kind_of: Callable[[str], str]) -> pd.DataFrame:
    """One row per cell of ``table``: its fields, ours (mean), n, ids, paper, diff."""
    cells = table_cells(table, backbones, kind_of)
    frame = pd.DataFrame([asdict(c) | {f"r_{k}": v for k, v in c.record_key().items()}
                          for c in cells], columns=_CELL + _KEY)
    ours = _latest_setting(records).groupby(_KEY).agg(ours=("top1", "mean"), n=("top1", "count"),
                                     ids=("record_id", tuple)).reset_index()
    frame = frame.merge(ours, how="left", on=_KEY).drop(columns=_KEY)
    frame = frame.merge(paper_numbers().rename(columns={"top1": "paper"}), how="left", on=_CELL)
    frame["diff"] = frame.ours - frame.paper
    return frame


def _latest_setting(records: pd.DataFrame) -> pd.DataFrame:
    """A cell averages the seeds of one setting (the record's configuration but its seed); an
    older setting of the same cell (a rebuilt store, other weights) is left out, not averaged."""
    latest = records.sort_values("created").drop_duplicates(_KEY, keep="last")[_KEY + ["setting"]]
    return records.merge(latest, on=_KEY + ["setting"])


def _grid(values: pd.DataFrame, layout: Layout) -> tuple[list[tuple], list[tuple], dict]:
    """Row keys (in the study's order), column keys (sorted) and cell lookup."""
    def keys(names: Sequence[str]) -> list[tuple]:
        return list(dict.fromkeys(values[list(names)].itertuples(index=False, name=None)))
    cols = sorted(keys(layout.cols), key=lambda c: [_ORDER.index(v) for v in c])
    lookup = {(tuple(r[n] for n in layout.rows), tuple(r[n] for n in layout.cols)): r
              for r in values.to_dict("records")}
    return keys(layout.rows), cols, lookup


def _csv_frame(values: pd.DataFrame, layout: Layout, compare: bool) -> pd.DataFrame:
    rows, cols, lookup = _grid(values, layout)
    out = []
    for row in rows:
        line = {n: (v if n == "backbone" else _join(layout, [n], [v]))
                for n, v in zip(layout.rows, row)}
        for col in cols:
            cell, name = lookup[row, col], _join(layout, layout.cols, col, " / ")
            line.update({f"{name}: ours": cell["ours"], f"{name}: n": cell["n"],
                         f"{name}: paper": cell["paper"],
                         f"{name}: diff": cell["diff"] if compare else np.nan})
        out.append(line)
    return pd.DataFrame(out).round(2)


def _fmt(value: float, n: float = 1) -> str:
    if pd.isna(value):
        return "—"
    return f"{value:.2f}" + (f" (n={int(n)})" if n > 1 else "")


def _markdown(values: pd.DataFrame, layout: Layout, section: Section) -> str:
    rows, cols, lookup = _grid(values, layout)
    header = [_HEADERS[n] for n in layout.rows] + [_join(layout, layout.cols, c, " / ")
                                                   for c in cols]
    lines = [f"### {layout.title}", "", f"{section.describe()}. Each cell: ours / study"
             + (" (ours − study)" if section.compare else "") + "; — = no record or no"
             " published number.", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for row in rows:
        text = [_join(layout, [n], [v]) for n, v in zip(layout.rows, row)]
        for col in cols:
            cell = lookup[row, col]
            diff = f" ({cell['diff']:+.2f})" if section.compare and pd.notna(cell["diff"]) else ""
            text.append(f"{_fmt(cell['ours'], cell['n'])} / {_fmt(cell['paper'])}{diff}")
        lines.append("| " + " | ".join(text) + " |")
    lines.append("")
    if (values.n > 1).any():
        lines.append("Note: (n=k) is the mean over k records of the same cell (different seeds).")
    if not section.compare:
        lines.append("Note: the study's numbers (CUB/Waterbirds, its protocol) are shown for"
                     " reference; these records are not like for like, so no difference is given.")
    return "\n".join(lines) + "\n"


def _plot(values: pd.DataFrame, layout: Layout, path: Path, title: str) -> None:
    """Grouped bars per row: CUB and Waterbirds, ours solid, the study's hatched."""
    rows, cols, lookup = _grid(values, layout)
    panels = list(dict.fromkeys(c[1:] for c in cols))  # one panel per non-dataset column
    fig = Figure(figsize=(max(6.0, 0.9 * len(rows)), 1.0 + 3.2 * len(panels)))
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend
    width, x = 0.2, np.arange(len(rows))
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        for j, (dataset, color) in enumerate((("cub", "C0"), ("waterbirds", "C1"))):
            cells = [lookup.get((r, (dataset, *panel)), {}) for r in rows]
            name = _LABELS["dataset"][dataset]
            ax.bar(x + (2 * j - 1.5) * width, [c.get("ours", np.nan) for c in cells], width,
                   color=color, label=f"{name} (ours)")
            ax.bar(x + (2 * j - 0.5) * width, [c.get("paper", np.nan) for c in cells], width,
                   fill=False, edgecolor=color, hatch="//", label=f"{name} (study)")
        ax.set_xticks(x, [_join(layout, layout.rows, r, "\n") for r in rows], fontsize=7)
        ax.set(ylim=(0, 118), yticks=range(0, 101, 20), ylabel="top-1 accuracy (%)",
               title=_join(layout, layout.cols[1:], panel, " / "))
    fig.axes[0].legend(fontsize=7, loc="upper center", ncol=4)  # in the headroom above 100
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


NOT_ENOUGH = "- **not enough records**"


def _check(claim: Claim, values: pd.DataFrame) -> str:
    """One findings line: supported / contradicted / mixed / not enough records, with evidence."""
    layout, sub = LAYOUTS[claim.table], values.dropna(subset=["ours"])
    for name, value in claim.where:
        sub = sub[sub[name] == value]
    verdicts = []
    for group, part in sub.groupby(list(claim.groups), sort=False):
        got = dict(zip(part[list(claim.keys)].itertuples(index=False, name=None), part.ours))
        ok = claim.test(got)
        if ok is not None:
            evidence = ", ".join(f"{_join(layout, claim.keys, k)} {v:.2f}" for k, v in got.items())
            verdicts.append((ok, f"{_join(layout, claim.groups, group)}: {evidence} → "
                                 + ("yes" if ok else "no")))
    if not verdicts:
        return f"{NOT_ENOUGH} — {claim.text}."
    hits = sum(ok for ok, _ in verdicts)
    verdict = ("supported" if hits == len(verdicts) else "contradicted" if hits == 0
               else f"mixed ({hits} of {len(verdicts)})")
    return f"- **{verdict}** — {claim.text}. " + "; ".join(text for _, text in verdicts) + "."


def _backbones(section: Section, table: int) -> list[str]:
    ours = sorted(section.records.r_backbone.dropna().unique())
    paper = list(dict.fromkeys(c.backbone for c in table_cells(table))) if section.compare else []
    return paper + [b for b in ours if b not in paper]


def _kind_of(records: pd.DataFrame, fallback: Callable[[str], str]) -> Callable[[str], str]:
    # A record with a CLS representation proves the model has prefix tokens: trust it
    # over the name heuristic.
    vits = set(records.r_backbone[records.r_representation.isin(["cls", "cls+patch"])])
    return lambda name: "vit" if name in vits else fallback(name)


def build_report(results_dir: str | Path = "results", tables: Sequence[int] = (3, 4, 5, 6),
                 out: str | Path = "reports/", mask_source: str | None = None,
                 kind_of: Callable[[str], str] = default_kind_of) -> ReportResult:
    """Write ``table<N>-<section>.{csv,md,png}``, report.md and summary.md under ``out``.

    ``mask_source``: report only records of that mask source (and baselines without
    one); None reports every mask source, each in its own section.
    """
    mask_source = mask_name(mask_source) if mask_source else None  # dir:PATH -> its name
    unknown = [t for t in tables if t not in LAYOUTS]
    if unknown:
        raise ProbeError(f"no such table {unknown}; the study's tables are {sorted(LAYOUTS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = _normalise(load_records(results_dir))
    kinds = _kind_of(records, kind_of)
    files: list[Path] = []
    written: list[tuple[int, bool, str]] = []  # (table, has records, markdown)
    findings, shown = [], set()
    for section in _sections(records, mask_source):
        values = {t: _cell_values(section.records, t, _backbones(section, t), kinds)
                  for t in LAYOUTS}  # all tables: the findings use them all
        for table in tables:
            layout, frame = LAYOUTS[table], values[table]
            has_records = bool(frame.ours.notna().any())
            if frame.empty or not (section.compare or has_records):
                continue
            shown.update(i for ids in frame.ids.dropna() for i in ids)
            stem, text = out / f"table{table}-{section.slug}", _markdown(frame, layout, section)
            _csv_frame(frame, layout, section.compare).to_csv(f"{stem}.csv", index=False)
            Path(f"{stem}.md").write_text(text, encoding="utf-8")
            _plot(frame, layout, Path(f"{stem}.png"), f"{layout.title}\n{section.describe()}")
            files += [Path(f"{stem}{ext}") for ext in (".csv", ".md", ".png")]
            written.append((table, has_records, text))
        if not section.records.empty:  # no verdicts from the study's numbers alone
            lines = [_check(claim, values[claim.table]) for claim in CLAIMS]
            if all(line.startswith(NOT_ENOUGH) for line in lines):  # a lone variant: one line
                findings.append(f"## Findings\n\n{section.describe()}: too few records to check "
                                "any of the study's claims.\n")
            else:
                findings.append(f"## Findings\n\n{section.describe()}.\n\n" + "\n".join(lines)
                                + "\n")
    if records.empty:
        findings.append(f"No run records in {results_dir}: fill them with `probe fit` or "
                        "`probe run`; only the study's numbers are shown.\n")
    hidden = sorted(set(records.record_id) - shown)
    if hidden:  # never drop records silently
        findings.append(f"{len(hidden)} record(s) in no table shown (outside the requested"
                        f" tables' cells, another mask source, or superseded by a newer setting"
                        f" of their cell): {', '.join(hidden)}\n")
    summary = "\n".join(findings)
    (out / "summary.md").write_text(summary, encoding="utf-8")
    (out / "report.md").write_text("\n".join(t for *_, t in written) + "\n" + summary,
                                   encoding="utf-8")
    files += [out / "summary.md", out / "report.md"]
    with_records = [text for _, has, text in written if has]
    headline = next((text for table, has, text in written if has and table == 4),
                    (with_records or [text for *_, text in written] or [""])[0])
    return ReportResult(files=files, headline=headline, summary=summary)
