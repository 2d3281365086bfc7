"""Foreground-background masks: train a binary segmenter on CUB's annotations, predict mask
folders usable as `dir:PATH` mask sources, measure their IoU, and derive masks without labels.

    probe.segment.train.train(...)                -> segmenter folder (json + safetensors)
    probe.segment.predict.predict(...)            -> masks/NAME/<rel>.png, masks/NAME/waterbirds/...
    probe.segment.evaluate.evaluate(...)          -> mean / foreground IoU per split
    probe.segment.unsupervised.unsupervised(...)  -> the same folder format, without labels

Each function lives in the module of its name (as probe.dump.dump does), so the modules stay
importable as modules.
"""

# Here rather than in models.py so that the CLI lists them without importing torch.
MODELS = {
    "light": "small decoder on a frozen probe backbone (--backbone); trains in minutes",
    "mask2former-swin-t": "transformers Mask2Former with a Swin-T backbone, fine-tuned end to end "
                          "(the study's model)",
}
