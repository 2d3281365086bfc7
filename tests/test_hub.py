"""The Hub check: cache first, the network only when the endpoint answers, within a deadline."""
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import huggingface_hub.constants
import pytest

from probe import hub


@pytest.fixture
def http_server():
    """A local HTTP server answering HEAD with the status in ``server.status``."""
    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(self.server.status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.status = 200
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


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
    with pytest.raises(hub.HubUnreachable,
                       match=re.escape(f"not in the Hugging Face cache and {reason}")):
        hub.cached_or_download(load)
    assert calls == [True]


def test_an_answering_hub_is_asked_after_a_cache_miss(local_hub, http_server):
    local_hub(f"http://127.0.0.1:{http_server.server_port}")
    assert hub.unreachable() is None
    load, calls = loader(cached=False)
    assert hub.cached_or_download(load) == "hub" and calls == [True, False]


def test_a_failing_hub_is_not_asked(local_hub, http_server):
    url = f"http://127.0.0.1:{http_server.server_port}"
    local_hub(url)
    http_server.status = 503
    assert hub.unreachable() == f"{url} answered HTTP 503"


def test_a_silent_endpoint_costs_one_deadline(local_hub, monkeypatch):
    """A request that hangs (a name lookup, a firewall dropping packets) is given up at the
    deadline, whatever the HTTP client's own timeouts would do."""
    class Hanging:
        def head(self, url, timeout):
            time.sleep(5)

    local_hub("http://hub.invalid")
    monkeypatch.setattr(huggingface_hub.utils, "get_session", Hanging)
    # had the wait lasted until the request returned, its answer (None) would be an error
    assert hub.unreachable(timeout=0.2) == "http://hub.invalid did not answer within 0.2 s"
