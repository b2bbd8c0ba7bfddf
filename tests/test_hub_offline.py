"""Offline hub loads fail at once (issue 25: `model=bert_base` took 53 s, a hub dataset 29 s of retries)."""

from __future__ import annotations

import datasets
import pytest
from huggingface_hub import constants

from robustft import hub
from robustft.errors import UserError
from tests.conftest import make_cfg


@pytest.fixture
def online_env(monkeypatch):
    """No offline variable set and the libraries' flags off, as on a machine whose user never set them."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", *hub.PROXY_VARS):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    probe = hub.reachable
    probe.cache_clear()
    yield
    probe.cache_clear()


def test_unreachable_hub_means_cache_only_inside_and_restored_after(online_env, monkeypatch):
    monkeypatch.setattr(hub, "reachable", lambda: False)
    with hub.cache_only_if_unreachable() as offline:
        assert offline and constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    assert not constants.HF_HUB_OFFLINE and not datasets.config.HF_HUB_OFFLINE


def test_reachable_hub_leaves_the_libraries_alone(online_env, monkeypatch):
    monkeypatch.setattr(hub, "reachable", lambda: True)
    with hub.cache_only_if_unreachable() as offline:
        assert not offline and not constants.HF_HUB_OFFLINE


def test_probe_of_a_closed_port_is_unreachable(online_env, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens on it here
    assert hub.reachable(timeout_s=1.0) is False


def test_uncached_hub_model_with_an_unreachable_hub_is_one_line(online_env, monkeypatch):
    from robustft.models import load_tokenizer

    monkeypatch.setattr(hub, "reachable", lambda timeout_s=hub.PROBE_TIMEOUT_S: False)
    cfg = make_cfg(["model=bert_base"])
    monkeypatch.setattr(cfg.model, "pretrained", "robustft-test/not-a-cached-model")
    with pytest.raises(UserError, match="not in the local Hugging Face cache and the hub is unreachable; use model=minilm"):
        load_tokenizer(cfg.model)


def test_hub_dataset_with_an_unreachable_hub_is_one_line(online_env, monkeypatch):
    from robustft.data import load_task

    monkeypatch.setattr(hub, "reachable", lambda timeout_s=hub.PROBE_TIMEOUT_S: False)
    monkeypatch.delenv("ROBUSTFT_DATA_DIR", raising=False)
    task = make_cfg(["task=sst2"]).task
    task.hub.path = "robustft-test/not-a-cached-dataset"
    with pytest.raises(UserError, match="offline and not in the local cache"):
        load_task(task, None, 0)
