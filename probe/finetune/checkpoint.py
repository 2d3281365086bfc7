"""Checkpoints and the per-epoch CSV log of a run folder.

A checkpoint is a folder ``checkpoint-<epoch>``: the model in safetensors, plus optimizer,
scheduler and loop state in a torch file that loads with ``weights_only=True``. It is written
under a temporary name and renamed, so a crash never leaves a half checkpoint that looks
complete; older checkpoints are deleted only after the new one is in place.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import safetensors.torch
import torch

from probe.errors import ProbeError
from probe.files import atomic

PREFIX = "checkpoint-"


def state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_weights(model: torch.nn.Module, path: Path) -> None:
    with atomic(path) as tmp:
        safetensors.torch.save_file(state_tensors(model), str(tmp))


def load_weights(model: torch.nn.Module, path: Path) -> None:
    model.load_state_dict(safetensors.torch.load_file(str(path), device="cpu"))


def save(run_dir: Path, epoch: int, model: torch.nn.Module, state: dict) -> Path:
    """Write checkpoint ``epoch`` (``state``: optimizer, scheduler, counters); drop older ones."""
    final = run_dir / f"{PREFIX}{epoch:04d}"
    shutil.rmtree(final, ignore_errors=True)  # a folder cannot be replaced by rename
    with atomic(final) as tmp:
        tmp.mkdir(parents=True)
        safetensors.torch.save_file(state_tensors(model), str(tmp / "model.safetensors"))
        torch.save(state, tmp / "state.pt")
    for old in run_dir.glob(f"{PREFIX}*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_dir: Path) -> Path | None:
    found = sorted(run_dir.glob(f"{PREFIX}[0-9][0-9][0-9][0-9]"))
    return found[-1] if found else None


def load(path: Path, model: torch.nn.Module) -> dict:
    """Load the model weights of checkpoint ``path`` into ``model``; returns its state dict."""
    try:
        load_weights(model, path / "model.safetensors")
        return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise ProbeError(f"cannot read checkpoint {path} ({err}); delete it to resume from the "
                         "one before, or start over without --resume") from None


class CsvLog:
    """``log.csv``: one row per epoch; on resume, rows after the checkpoint are dropped."""

    def __init__(self, path: Path, columns: list[str], keep_epochs: int, enabled: bool = True):
        self.path, self.columns, self.enabled = path, columns, enabled
        if not enabled:
            return
        rows = []
        if keep_epochs and path.is_file():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= keep_epochs]
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict) -> None:
        if self.enabled:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(row)
