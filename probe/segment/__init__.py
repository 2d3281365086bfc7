"""Foreground-background masks: train a binary segmenter on CUB's annotations, predict mask
folders usable as `dir:PATH` mask sources, measure their IoU, and derive masks without labels.

    train(...)        -> a segmenter folder (segmenter.json + segmenter.safetensors)
    predict(...)      -> masks/NAME/<rel>.png (CUB) and masks/NAME/waterbirds/<rel>.png
    evaluate(...)     -> mean / foreground IoU per split against the CUB ground truth
    unsupervised(...) -> the same folder format from a frozen backbone's own features
"""

from probe.segment.evaluate import evaluate
from probe.segment.predict import predict
from probe.segment.train import train
from probe.segment.unsupervised import unsupervised

__all__ = ["evaluate", "predict", "train", "unsupervised"]
