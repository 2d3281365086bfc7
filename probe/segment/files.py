"""JSON files written atomically and the provenance file of a mask folder."""

import json
from pathlib import Path

from probe.errors import ConfigMismatchError
from probe.files import atomic

SOURCE_FILE = "source.json"  # in a mask folder: what produced its masks


def write_json(path: Path, data: dict) -> None:
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def claim_mask_folder(folder: Path, config: dict) -> None:
    """Record what makes this folder's masks; refuse to mix masks of two producers in one folder
    (an interrupted run resumes only with the same model or method)."""
    path = folder / SOURCE_FILE
    config = json.loads(json.dumps(config))  # tuples -> lists, as they read back
    if path.is_file():
        found = json.loads(path.read_text(encoding="utf-8"))
        if found != config:
            keys = sorted(k for k in set(found) | set(config) if found.get(k) != config.get(k))
            raise ConfigMismatchError(
                f"{folder} holds masks made with another configuration (differs in "
                f"{', '.join(keys)}; see {path}); choose another --out or delete that folder")
        return
    write_json(path, config)
