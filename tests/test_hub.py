"""The Hub check: cache first, the network only when the endpoint answers, proxies trusted."""
import re
import socket

import huggingface_hub.constants
import pytest

from probe import hub


@pytest.fixture
def listening_endpoint(monkeypatch):
    """An endpoint that accepts connections (a bare listening socket), offline mode off."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for name in hub.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT",
                        f"http://127.0.0.1:{server.getsockname()[1]}")
    yield
    server.close()


def loader(cached: bool):
    """A load function recording each call's local_files_only; it finds a file only in the
    cache when ``cached``, and always on the Hub."""
    calls = []

    def load(local_files_only: bool):
        calls.append(local_files_only)
        if local_files_only and not cached:
            raise FileNotFoundError("not cached")
        return "cache" if local_files_only else "hub"
    return load, calls


def test_cached_files_need_no_network(hub_out_of_reach):
    load, calls = loader(cached=True)
    assert hub.cached_or_download(load) == "cache" and calls == [True]


def test_out_of_reach_raises_the_reason_without_trying_the_hub(hub_out_of_reach):
    _, reason = hub_out_of_reach
    load, calls = loader(cached=False)
    with pytest.raises(hub.HubUnreachable, match=re.escape(f"not in the Hugging Face cache and {reason}")):
        hub.cached_or_download(load)
    assert calls == [True]


def test_reachable_hub_is_asked_after_a_cache_miss(listening_endpoint):
    assert hub.unreachable() is None
    load, calls = loader(cached=False)
    assert hub.cached_or_download(load) == "hub" and calls == [True, False]


def test_a_proxy_is_trusted_to_reach_the_hub(hub_out_of_reach, monkeypatch):
    _, reason = hub_out_of_reach
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    expected = reason if "HF_HUB_OFFLINE" in reason else None  # offline mode still wins
    assert hub.unreachable() == expected
