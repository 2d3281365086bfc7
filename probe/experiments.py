"""The study's experiment grid (Tables 3-6) as data, and what it takes to fill it.

A *cell* is one published number: (table, backbone, strategy, representation,
stage, regime, train input, test input, eval dataset), in the paper's vocabulary
(the vocabulary of ``paper_tables.csv``):

- representation "gap" is a ConvNeXt's global average pool, our "patch";
- stage is "" unless the cell is late masking ("L" or "L-1"); Table 5's "0" is
  early masking (masking at the image);
- Table 3's "Masked" rows are early masking: trained on masked images, tested
  on original and on masked images.

``plan`` turns cells into the work that produces them: feature dumps, frozen
fits (``probe.fit.fit`` kwargs) and fine-tunes (``probe.finetune.finetune``
kwargs). One fit yields every eval set, so many cells share a fit and the plan
lists each piece of work once. ``CLAIMS`` states the study's main conclusions
as checks over cells, so a report can say which of them our numbers support.

Table 5 (masking at L, L-1 and the image) was only fine-tuned in the study. Its
grid here also holds the frozen counterpart of every cell (no published number):
on cached features it costs seconds, and it is what the store's
``L.from-masked-L-1.<mask>`` tap exists for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from importlib import resources
from typing import NamedTuple

import pandas as pd

from probe.errors import ProbeError

TABLES = (3, 4, 5, 6)
PAPER_DATASET = "cub"  # the training data of every published number
#: The run-record columns (``probe.results.COLUMNS``) that identify a cell.
RECORD_KEYS = ("backbone", "regime", "strategy", "stage", "representation", "train_input",
               "test_input", "dataset")
_FROZEN_TWINS = (5,)  # tables published fine-tuned only; see the module docstring
_MASK_ARG = {"baseline": "none", "early": "early", "late": "late"}
# A backbone absent from a table gets the rows of the first of these that is in it,
# so a user's own model is planned (and reported) exactly like its paper sibling.
_TEMPLATES = {"vit": ("vit_b", "vit_s", "vit_l"),
              "convnext": ("convnext_b", "convnext_s", "convnext_l")}


@dataclass(frozen=True)
class Cell:
    """One number of the study's tables, in the paper's vocabulary."""

    table: int
    backbone: str
    strategy: str        # "baseline" | "early" | "late"
    representation: str  # "cls" | "patch" | "cls+patch" | "gap"
    stage: str           # "" | "L" | "L-1" | "0" (Table 5: early masking)
    regime: str          # "frozen" | "finetuned"
    train_input: str     # "original" | "masked"
    test_input: str      # "original" | "masked"
    dataset: str         # "cub" | "waterbirds"

    def record_key(self) -> dict:
        """This cell's values of ``RECORD_KEYS``, in the records' vocabulary."""
        return dict(backbone=self.backbone, regime=self.regime, strategy=self.strategy,
                    stage=self.stage if self.strategy == "late" else "",
                    representation="patch" if self.representation == "gap"
                    else self.representation,
                    train_input=self.train_input, test_input=self.test_input,
                    dataset=self.dataset)

    def model_spec(self, mask_source: str = "gt") -> dict:
        """kwargs of ``probe.fit.fit`` (frozen) or ``probe.finetune.finetune`` (fine-tuned)."""
        key = self.record_key()
        return dict(backbone=self.backbone, head=key["representation"],
                    mask=_MASK_ARG[self.strategy],
                    stage=self.stage if self.strategy == "late" else "L",
                    mask_source=mask_source)

    def dumps(self, mask_source: str = "gt") -> list[dict]:
        """kwargs of ``probe.dump.dump`` (less the data root) for the stores a frozen fit reads.

        The train input's store, plus the test input's when it differs (Table 3's
        cross-tests). Late masking at L-1 needs the tap ``L.from-masked-L-1`` (the last stage
        recomputed by the dump from the background-zeroed L-1 map). Fine-tuning reads images:
        no dumps.
        """
        if self.regime != "frozen":
            return []
        late_lm1 = self.strategy == "late" and self.stage == "L-1"
        taps = ("L", "L.from-masked-L-1") if late_lm1 else ("L",)
        inputs = dict.fromkeys((self.train_input, self.test_input))
        return [dict(backbone=self.backbone, input=i, masks=mask_source, taps=taps)
                for i in inputs]


@lru_cache(maxsize=1)
def _paper() -> pd.DataFrame:
    text = resources.files("probe").joinpath("paper_tables.csv")
    with resources.as_file(text) as path:
        frame = pd.read_csv(path, dtype={"stage": str})
    frame["stage"] = frame["stage"].fillna("")
    return frame


def paper_numbers() -> pd.DataFrame:
    """The study's 126 published top-1 accuracies (long form, one row per cell).

    Columns: table, backbone, strategy, representation, stage ("" when none),
    regime, train_input, test_input, dataset, top1.
    """
    return _paper().copy()


def default_kind_of(backbone: str) -> str:
    """"vit" for ViT-like names (prefix tokens), else "convnext" (a plain feature map)."""
    name = backbone.lower()
    return "vit" if name.startswith(("vit", "hf:")) or "vit" in name else "convnext"


def _paper_cells(table: int) -> list[Cell]:
    rows = _paper()[_paper()["table"] == table]
    names = [f.name for f in fields(Cell)]
    cells = []
    for _, row in rows.iterrows():
        cell = Cell(**{n: (int(row[n]) if n == "table" else str(row[n])) for n in names})
        cells.append(cell)
        if table in _FROZEN_TWINS:
            cells.append(replace(cell, regime="frozen"))
    return cells


def table_cells(table: int, backbones: Iterable[str] | None = None,
                kind_of: Callable[[str], str] = default_kind_of) -> list[Cell]:
    """The cells of ``table`` for ``backbones`` (default: the paper's backbones of that table).

    A backbone the table does not list gets the rows of its kind's paper template
    (ViT-B for "vit", ConvNeXt-B for "convnext"); none if the study had no such rows
    (e.g. Table 5 has no ViT, Table 6 no ConvNeXt).
    """
    if table not in TABLES:
        raise ProbeError(f"unknown table {table!r}; the study's tables are {TABLES}")
    cells = _paper_cells(table)
    by_backbone: dict[str, list[Cell]] = {}
    for cell in cells:
        by_backbone.setdefault(cell.backbone, []).append(cell)
    if backbones is None:
        return cells
    out: list[Cell] = []
    for backbone in backbones:
        if backbone in by_backbone:
            out.extend(by_backbone[backbone])
            continue
        template = next((t for t in _TEMPLATES.get(kind_of(backbone), ()) if t in by_backbone),
                        None)
        if template is not None:
            out.extend(replace(c, backbone=backbone) for c in by_backbone[template])
    return out


def _unique(specs: Iterable[dict]) -> list[dict]:
    seen: dict[tuple, dict] = {}
    for spec in specs:
        seen.setdefault(tuple(sorted(spec.items())), spec)
    return list(seen.values())


def plan(tables: Sequence[int] = TABLES, backbones: Iterable[str] | None = None,
         frozen_only: bool = False, *, kind_of: Callable[[str], str] = default_kind_of,
         mask_source: str = "gt") -> tuple[list[dict], list[dict], list[dict]]:
    """The work that fills ``tables`` for ``backbones``: ``(dumps, fits, finetunes)``.

    - dumps: ``probe.dump.dump`` kwargs ``dict(backbone, input, masks, taps)``, one per
      store (the taps of all cells that read a store are merged);
    - fits: ``probe.fit.fit`` kwargs ``dict(backbone, head, mask, stage, mask_source)``;
    - finetunes: ``probe.finetune.finetune`` kwargs, same keys as fits.
    Each list is in first-needed order without duplicates. ``frozen_only`` drops
    the fine-tuned cells (and so all fine-tunes).
    """
    backbones = None if backbones is None else list(backbones)
    cells = [c for t in tables for c in table_cells(t, backbones, kind_of)
             if not (frozen_only and c.regime == "finetuned")]
    stores: dict[tuple, dict] = {}
    for cell in cells:
        for dump in cell.dumps(mask_source):
            key = (dump["backbone"], dump["input"], dump["masks"])
            merged = stores.setdefault(key, dict(dump))
            merged["taps"] = tuple(dict.fromkeys(merged["taps"] + dump["taps"]))
    fits = _unique(c.model_spec(mask_source) for c in cells if c.regime == "frozen")
    finetunes = _unique(c.model_spec(mask_source) for c in cells if c.regime == "finetuned")
    return list(stores.values()), fits, finetunes


class Claim(NamedTuple):
    """One of the study's claims, to be checked on our numbers, one verdict per group.

    Within a group (e.g. one backbone and regime) the cells of ``table`` are keyed
    by the ``keys`` fields (a tuple of their values); ``test`` gets ``{key: top1}``
    and says whether the claim holds, or None when the group lacks the cells to decide.
    """

    text: str
    table: int
    groups: tuple[str, ...]
    keys: tuple[str, ...]
    where: tuple[tuple[str, str], ...]  # (Cell field, value) pairs the cells must have
    test: Callable[[dict], bool | None]


def _best(target: tuple) -> Callable[[dict], bool | None]:
    return lambda got: None if target not in got or len(got) < 2 \
        else got[target] >= max(got.values())


def _beats(a: tuple, b: tuple) -> Callable[[dict], bool | None]:
    return lambda got: None if a not in got or b not in got else got[a] > got[b]


def _gap_shrinks(got: dict) -> bool | None:
    gap = {s: got[s, "cub"] - got[s, "waterbirds"] for s in ("baseline", "early")
           if (s, "cub") in got and (s, "waterbirds") in got}
    return gap["early"] < gap["baseline"] if len(gap) == 2 else None


def _increasing(order: Sequence[tuple]) -> Callable[[dict], bool | None]:
    def test(got: dict) -> bool | None:
        seq = [got[k] for k in order if k in got]
        return None if len(seq) < 2 else all(a < b for a, b in zip(seq, seq[1:]))
    return test


_OOD = (("dataset", "waterbirds"),)
_PER_MODEL = ("backbone", "regime")
CLAIMS = (
    Claim("Early masking gives the best out-of-distribution (Waterbirds) accuracy of the"
          " strategies, for every backbone", 4, _PER_MODEL, ("strategy",), _OOD,
          _best(("early",))),
    Claim("Late masking beats the baseline out of distribution", 4, _PER_MODEL, ("strategy",),
          _OOD, _beats(("late",), ("baseline",))),
    Claim("Early masking shrinks the OOD gap (CUB − Waterbirds) compared with the baseline", 4,
          _PER_MODEL, ("strategy", "dataset"), (), _gap_shrinks),
    Claim("Masking earlier helps out of distribution: image (0) > L-1 > L", 5, _PER_MODEL,
          ("stage",), _OOD, _increasing([("L",), ("L-1",), ("0",)])),
    # The study's frozen numbers do not show this (CLS+Patch wins there): fine-tuned only.
    Claim("Patch tokens with early masking are the most OOD-robust ViT representation"
          " (fine-tuned)", 6, ("backbone",), ("strategy", "representation"),
          _OOD + (("regime", "finetuned"),), _best(("early", "patch"))),
)
