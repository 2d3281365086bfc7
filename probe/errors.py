"""User-facing errors: the message says what was wrong, where, and what to do."""


class ProbeError(Exception):
    """An error caused by the user's input or environment, shown without a traceback."""


class DataError(ProbeError):
    """A dataset folder, index file, image or mask is missing or malformed."""


class ConfigMismatchError(ProbeError):
    """An existing artefact was produced with a different configuration than requested."""


class WeightsUnavailableError(ProbeError):
    """Pretrained weights cannot be obtained (offline, wrong file, unknown tag)."""
