"""method=ascc: the weights and the loss against the official `get_adv_by_convex_syn` + training loss written out,
and the adversarial embeddings stay in the convex hull of each word's substitution set."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from robustft.methods.ascc import ASCC
from robustft.methods.base import TrainContext
from tests.tiny_models import one_thread, tiny_sst2  # noqa: F401  (module fixture)

DATA = Path(os.environ.get("ROBUSTFT_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
CONF = Path(__file__).resolve().parent.parent / "robustft" / "conf"
pytestmark = pytest.mark.skipif(not (DATA / "word_substitution" / "counterfitted_neighbors.json").exists(),
                                reason="needs the data bundle's counter-fitted lists")


def tiny_setup(method, seed: int = 1):
    """(model, batch): `method` set up on the tiny random BERT (MiniLM's WordPiece vocabulary) and two sentences
    with substitutable words (ASCC's and DNE's tests)."""
    model, tok, task = tiny_sst2(("a", "b"))
    ctx = TrainContext(task=task, trainer=OmegaConf.create({}), device=torch.device("cpu"), seed=seed, tokenizer=tok,
                       data_dir=DATA)
    method.setup(model, ctx)
    b = dict(tok(["a good movie with great acting", "terrible , bad and awful plot"], padding=True,
                 return_tensors="pt"))
    b["labels"] = torch.tensor([1, 0])
    return model, b


def setup(steps: int = 3):
    m = ASCC("ascc", path="word_substitution/counterfitted_neighbors.json", beta=4.0, attack_steps=steps, w_lr=1.0,
             w_weight_decay=2e-5, sparse_weight=15.0)
    return m, *tiny_setup(m)


def official(model, b, syn, valid, steps, lr, wd, sparse, beta):
    """get_adv_by_convex_syn (loss_func kl, out_type comb_p) then TextDefender's ASCC loss, as the official code:
    eval mode, loss.backward() on w (the model's gradients zeroed before the training loss), Adam on w."""
    emb = model.get_input_embeddings()

    def to_logit(e):
        return model(inputs_embeds=e, attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"]).logits

    model.eval()
    syn_embd = emb(syn).detach()
    n, length, s, _ = syn_embd.shape
    w = torch.empty(n, length, s, 1)
    nn.init.kaiming_normal_(w)
    w.requires_grad_()
    optimizer = torch.optim.Adam([w], lr=lr, weight_decay=wd)
    v = valid.reshape(n, length, s, 1).float()
    with torch.no_grad():
        logit_ori = to_logit(emb(b["input_ids"]))
    for _ in range(steps):
        optimizer.zero_grad()
        ww = w * v + 500 * (v - 1)
        embd_adv = (F.softmax(ww, -2) * syn_embd.detach()).sum(-2)
        loss = -nn.KLDivLoss(reduction="sum")(F.log_softmax(to_logit(embd_adv), dim=1), F.softmax(logit_ori, dim=1))
        loss = loss + sparse * (-F.softmax(ww, -2) * F.log_softmax(ww, -2)).sum(-2).mean()
        loss.backward()
        optimizer.step()
    p = F.softmax(w * v + 500 * (v - 1), -2).detach()
    model.zero_grad()
    model.train()
    clean = model(**{k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits
    adv = to_logit((p * emb(syn)).sum(-2))
    loss = F.cross_entropy(clean, b["labels"]) + beta * F.kl_div(torch.softmax(adv, 1).log(), torch.softmax(clean, 1),
                                                                 None, None, "batchmean")
    return p, loss


def test_weights_loss_and_gradients_equal_the_official(one_thread):  # noqa: F811
    m, model, b = setup(steps=3)
    for mod in model.modules():  # no dropout: the official's forwards and ours see one network
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    model.config.attention_probs_dropout_prob = 0.0
    ref = copy.deepcopy(model)
    syn, valid = m.synonyms(b)
    torch.manual_seed(5)
    out = m.training_step(model, b)
    out.loss.backward()
    torch.manual_seed(5)
    p, loss = official(ref, b, syn, valid, 3, 1.0, 2e-5, 15.0, 4.0)
    loss.backward()
    assert (m.p - p).abs().max().item() < 1e-6
    assert abs(out.loss.item() - loss.item()) < 1e-5
    diff = max((a.grad - r.grad).abs().max().item() for a, r in zip(model.parameters(), ref.parameters())
               if a.grad is not None)
    assert diff < 1e-5
    assert model.training


def test_adversarial_embeddings_stay_in_the_hull_of_each_set(one_thread):  # noqa: F811
    m, model, b = setup(steps=4)
    syn, valid = m.synonyms(b)
    assert valid[..., 1:].any()  # some words have substitutes
    m.training_step(model, b)
    p = m.p.squeeze(-1)
    assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones_like(p[..., 0]), atol=1e-6)
    assert (p[~valid] == 0).all()  # no weight off the set
    fixed = ~valid[..., 1:].any(-1)  # tokens without substitutes keep their own embedding
    assert (p[fixed][:, 0] == 1).all()
    emb = model.get_input_embeddings().weight.detach()
    adv = (m.p * emb[syn]).sum(-2)
    # each adversarial embedding is a convex combination of the set's embeddings: inside their bounding box
    lo = torch.where(valid.unsqueeze(-1), emb[syn], torch.inf).amin(-2)
    hi = torch.where(valid.unsqueeze(-1), emb[syn], -torch.inf).amax(-2)
    assert ((adv >= lo - 1e-6) & (adv <= hi + 1e-6)).all()
