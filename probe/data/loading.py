"""DataLoader iteration whose user errors reach the caller unchanged.

torch re-raises an exception from a worker process with the worker's traceback pasted into its
message, which the CLI would then print to the user; here a ProbeError travels back as a value
and is raised again, as it was, in the main process.
"""

from collections.abc import Iterator
from functools import partial

import torch
from torch.utils.data import default_collate

from probe.errors import ProbeError


class _Guarded(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            return self.dataset[i]
        except ProbeError as err:
            return err


def _collate(collate_fn, items):
    errors = [item for item in items if isinstance(item, ProbeError)]
    return errors[0] if errors else collate_fn(items)


def guarded_loader(dataset, *, collate_fn=default_collate, **loader_kwargs) -> Iterator:
    """Iterate a DataLoader over `dataset` (any DataLoader keyword arguments)."""
    loader = torch.utils.data.DataLoader(_Guarded(dataset), collate_fn=partial(_collate, collate_fn),
                                         **loader_kwargs)
    for batch in loader:
        if isinstance(batch, ProbeError):
            raise batch
        yield batch


def batches(dataset, *, batch_size: int, workers: int, sampler=None) -> Iterator[list]:
    """Lists of `batch_size` items decoded by `workers` processes."""
    return guarded_loader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                          collate_fn=list)
