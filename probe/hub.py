"""The Hugging Face Hub: cached files first, and a plain answer at once when it is out of reach.

Without a network huggingface_hub retries each request for about 30 s, printing a warning per
retry, before it fails; on an offline cluster node the user should get the reason right away.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlparse

T = TypeVar("T")
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                   "all_proxy")


class HubUnreachable(OSError):
    """Nothing cached, and the Hub cannot be asked now; the message says why."""


def offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it only once, at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return env or bool(constants.HF_HUB_OFFLINE)


def unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hub cannot be used now (offline mode, or no connection to its endpoint within
    ``timeout`` seconds), or None when a download may be tried."""
    if offline():
        return "offline mode is on (HF_HUB_OFFLINE)"
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None  # only the download itself, through the proxy, can tell
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        return f"{url.hostname}:{port} cannot be reached ({e.strerror or e})"
    return None


def cached_or_download(load: Callable[[bool], T]) -> T:
    """``load(local_files_only)``: from the local cache first, which needs no network; then from
    the Hub when it can be reached. Raises HubUnreachable when it cannot."""
    try:
        return load(True)
    except OSError as miss:
        if (reason := unreachable()) is not None:
            raise HubUnreachable(f"not in the Hugging Face cache and {reason}") from miss
    return load(False)
