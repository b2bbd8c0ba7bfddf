"""Tiny randomly initialised models of each architecture family the model group offers, built offline.

Shared by the method tests (BERT/MiniLM, RoBERTa, DeBERTa-v2/v3 code paths: embeddings, heads, layer names).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, BertConfig, DebertaV2Config, RobertaConfig

VOCAB = 60
ARCHS = ("bert", "roberta", "deberta")


def tiny_model(arch: str = "bert", *, hidden: int = 8, intermediate: int = 16, labels: int = 2, dropout: float = 0.0,
               seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A 2-layer sequence classifier of `arch` in train mode (eager attention: some tests need double backward)."""
    common = {"vocab_size": VOCAB, "hidden_size": hidden, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": intermediate, "max_position_embeddings": 40, "num_labels": labels,
              "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    if arch == "bert":
        config = BertConfig(**common)
    elif arch == "roberta":
        config = RobertaConfig(**common, pad_token_id=1)
    else:
        config = DebertaV2Config(**common, relative_attention=True, position_buckets=8, pos_att_type=["p2c", "c2p"],
                                 share_att_key=True, norm_rel_ebd="layer_norm", max_relative_positions=-1)
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="eager").to(dtype).train()


def tiny_sst2(label_names: tuple[str, str] = ("negative", "positive")):
    """(model in train mode, tokenizer, task node): model=tiny_random (MiniLM's WordPiece vocabulary, so the
    counter-fitted word lists apply) as an SST-2 classifier, seeded; for the defences that read real words."""
    from omegaconf import OmegaConf

    from robustft.config import CONF_DIR
    from robustft.models import load_model, load_tokenizer

    model_cfg = OmegaConf.load(CONF_DIR / "model" / "tiny_random.yaml")
    task = OmegaConf.create({"name": "sst2", "text_fields": ["sentence"], "label_names": list(label_names),
                             "is_regression": False, "num_labels": 2})
    torch.manual_seed(0)
    return load_model(model_cfg, task).train(), load_tokenizer(model_cfg), task


def token_batch(n: int = 6, length: int = 7, seed: int = 1, labels: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, labels, (n,), generator=g)}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread (on a shared 2-core machine extra threads only add sync waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
