"""Fine-tuning with masking inside the model (the study's Tables 4-6, fine-tuned columns).

`finetune(backbone, data_root, mask=..., ...)` trains on images (the one place features cannot
be cached), evaluates on CUB test and Waterbirds and writes a run record like `probe fit`.
"""

from probe.finetune.train import finetune

__all__ = ["finetune"]
