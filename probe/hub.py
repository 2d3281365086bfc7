"""The Hugging Face Hub: cached files first, and a plain answer at once when it is out of reach.

Without a network huggingface_hub retries each request for about 30 s, printing a warning per
retry, before it fails; on an offline cluster node the user should get the reason right away.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class HubUnreachable(OSError):
    """Nothing cached, and the Hub cannot be asked now; the message says why."""


def offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it only once, at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return env or bool(constants.HF_HUB_OFFLINE)


def unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hub cannot be used now, or None when a download may be tried.

    One HEAD request to the endpoint through huggingface_hub's own HTTP session (so the same
    proxies and certificates as a download), no retries, and one deadline for all of it: the
    name lookup and every address of the host included.
    """
    if offline():
        return "offline mode is on (HF_HUB_OFFLINE)"
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    endpoint, answer = constants.ENDPOINT, {}

    def ask() -> None:
        try:
            answer["status"] = get_session().head(endpoint, timeout=timeout).status_code
        except Exception as e:  # any failure to get an answer means: do not start a download
            answer["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__

    asking = threading.Thread(target=ask, daemon=True)  # a hung lookup is left behind
    asking.start()
    asking.join(timeout)
    if "error" in answer:
        return f"{endpoint} cannot be reached ({answer['error']})"
    if "status" not in answer:
        return f"{endpoint} did not answer within {timeout:g} s"
    if answer["status"] >= 500:
        return f"{endpoint} answered HTTP {answer['status']}"
    return None


def cached_or_download(load: Callable[[bool], T]) -> T:
    """``load(local_files_only)``: from the local cache first, which needs no network; then from
    the Hub when it answers. Raises HubUnreachable when it does not."""
    try:
        return load(True)
    except OSError as miss:
        if (reason := unreachable()) is not None:
            raise HubUnreachable(f"not in the Hugging Face cache and {reason}") from miss
    return load(False)


def known_missing(repo_id: str, filename: str) -> bool:
    """The cache remembers the Hub answering that the repository has no such file."""
    from huggingface_hub import _CACHED_NO_EXIST, try_to_load_from_cache

    return try_to_load_from_cache(repo_id, filename) is _CACHED_NO_EXIST
