"""The Hugging Face hub, offline: use the local cache only, and fail at once, when the hub cannot be reached.

Why: without HF_HUB_OFFLINE on a machine without internet, huggingface_hub and datasets retry every request
with back-off: `model=bert_base` took 53 s and a hub dataset (no data_dir) 29 s to fail (issue 25). So
before a hub load robustft probes the hub's host once (a TCP connection, 3 s at most); when it is
unreachable, the load runs as if HF_HUB_OFFLINE were set: a cached model or dataset still loads, anything
else fails in well under a second. Nothing here downloads anything.

At the bottom of the layers: the standard library, and huggingface_hub / datasets' offline flags.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import sys
import threading
from collections.abc import Iterator
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
TRUE = ("1", "true", "yes", "on")
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def env_offline() -> bool:
    """The user asked for offline mode (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE or TRANSFORMERS_OFFLINE)."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(n, "").strip().lower() in TRUE for n in names)


@functools.cache
def reachable(timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub's host (HF_ENDPOINT) opens within `timeout_s` (once per process).

    Behind a proxy (HTTPS_PROXY, ALL_PROXY) the direct connection says nothing: assume reachable. The
    probe runs in a thread so a name lookup that hangs cannot hold the run longer than `timeout_s`.
    """
    if any(os.environ.get(v) for v in PROXY_VARS):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result and result[0])


def offline() -> bool:
    """Offline: asked for by the environment, or the hub unreachable."""
    return env_offline() or not reachable()


@contextlib.contextmanager
def cache_only_if_unreachable() -> Iterator[bool]:
    """Inside: huggingface_hub and datasets in offline mode when the hub is unreachable (cache only, no
    retries), as HF_HUB_OFFLINE would set them; yields whether loads are offline. Restored on exit."""
    if env_offline():
        yield True
        return
    if reachable():
        yield False
        return
    from huggingface_hub import constants

    saved = [(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)]
    if "datasets" in sys.modules:
        config = sys.modules["datasets"].config
        saved += [(config, "HF_HUB_OFFLINE", config.HF_HUB_OFFLINE), (config, "HF_DATASETS_OFFLINE", config.HF_DATASETS_OFFLINE)]
    try:
        for module, name, _ in saved:
            setattr(module, name, True)
        yield True
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
