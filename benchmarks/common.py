"""Shared by the benchmarks: what machine the figures come from, and a timer."""

import os
import platform
import time
from contextlib import contextmanager

import torch


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch threads")


@contextmanager
def timed(into: dict, key: str):
    start = time.perf_counter()
    yield
    into[key] = time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    """Wait for the GPU before reading a clock: its kernels run after the Python call returns."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
