"""Embedding-space defences of issue #29: method=pgd (PGD-K) and the FreeLB++ arm of method=freelb.

PGD's parameter gradients against the FreeLB repository's `std_adv_train_step` written out on a tiny model,
its delta in its ball, the loss it trains on, bad options; FreeLB++'s arm composing to TextDefender's values.
Exact resume of every method YAML is tests/test_method_contract.py's; flops factors tests/test_flops_factor.py's.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from sklearn.utils import shuffle as sklearn_shuffle

from robustft.errors import UserError
from robustft.methods.infobert import club_generator, robust_features
from tests.conftest import make_cfg
from tests.test_perturbation import grads_of, method
from tests.tiny_models import one_thread, tiny_model  # noqa: F401  (one_thread: module fixture)
from tests.weight_mixup_helpers import batch

pytestmark = pytest.mark.usefixtures("one_thread")


def official_pgd(model, b, steps, adv_lr, init_mag, max_norm):
    """zhuchen03/FreeLB fairseq-RoBERTa sentence_prediction.py `std_adv_train_step` (l2), in plain torch.

    Its dropout masks are drawn by the first forward and reused (`init_dp=False`): here torch's RNG is
    replayed. The criterion's summed loss is a mean here (the loop's convention; the direction g / ||g|| and
    fairseq's later division by the sample size make it the same update).
    """
    emb, m = model.get_input_embeddings(), b["attention_mask"].float()
    embeds_init = emb(b["input_ids"])
    delta = torch.zeros_like(embeds_init).uniform_(-1, 1) * m.unsqueeze(2)
    delta = (delta * (init_mag / torch.sqrt(m.sum(1) * embeds_init.size(-1))).view(-1, 1, 1)).detach()
    delta.requires_grad_()
    rng = torch.get_rng_state()
    logits = model(inputs_embeds=delta + embeds_init, attention_mask=b["attention_mask"]).logits
    loss = F.cross_entropy(logits, b["labels"])
    for _ in range(steps):
        delta_grad = torch.autograd.grad(loss, delta)[0].detach()
        denorm = torch.norm(delta_grad.view(delta_grad.size(0), -1), dim=1).view(-1, 1, 1)
        delta = (delta + adv_lr * delta_grad / denorm).detach()
        if max_norm > 0:
            delta_norm = torch.norm(delta.view(delta.size(0), -1).float(), p=2, dim=1).detach()
            exceed_mask = (delta_norm > max_norm).float()
            delta = delta * (max_norm / delta_norm * exceed_mask + (1 - exceed_mask)).view(-1, 1, 1).detach()
        delta.requires_grad_()
        adv_embeds_init = emb(b["input_ids"])
        torch.set_rng_state(rng)
        logits = model(inputs_embeds=delta + adv_embeds_init, attention_mask=b["attention_mask"]).logits
        loss = F.cross_entropy(logits, b["labels"])
    loss.backward()
    return grads_of(model), loss.detach(), delta.detach()


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_pgd_gradients_equal_the_official_std_adv_train_step(arch):
    b = batch(4, 7, 2)
    ref = tiny_model(arch, dropout=0.1)
    torch.manual_seed(5)
    expected, ref_loss, ref_delta = official_pgd(ref, b, 3, 0.1, 1.0, 0.6)
    model = tiny_model(arch, dropout=0.1)
    m = method("pgd", model, adv_steps=3)
    torch.manual_seed(5)
    out = m.training_step(model, b)
    (out.loss / 2).backward()  # as the loop does with two micro-batches per optimizer step
    got = grads_of(model)
    assert got.keys() == expected.keys()
    worst = max((2 * got[k] - expected[k]).abs().max().item() for k in got)
    assert worst < 1e-6, worst
    assert abs(out.loss.item() - ref_loss.item()) < 1e-6
    assert (m.delta - ref_delta).abs().max().item() < 1e-6
    # the word-embedding matrix trains through the final forward only, on the real tokens' rows
    assert got["bert.embeddings.word_embeddings.weight" if arch == "bert" else
               "roberta.embeddings.word_embeddings.weight"].abs().sum() > 0


@pytest.mark.parametrize("norm_type", ["l2", "linf"])
def test_pgd_delta_stays_in_its_ball_and_the_loss_is_the_adversarial_one(norm_type):
    model = tiny_model("bert", dropout=0.0)
    radius = 0.3
    m = method("pgd", model, adv_steps=4, adv_lr=0.5, adv_init_mag=0.1, adv_max_norm=radius, norm_type=norm_type)
    b = batch(4, 7, 1)
    out = m.training_step(model, b)
    flat = m.delta.flatten(1)
    size = flat.norm(dim=1) if norm_type == "l2" else flat.abs().amax(1)
    assert (size <= radius * (1 + 1e-5)).all() and size.max().item() > 0.99 * radius  # the ball binds
    assert m.delta[0, -2:].eq(0).all()  # padding is never perturbed
    with torch.no_grad():  # no dropout: the loss is the task loss at e + delta, and above the clean one
        e = model.get_input_embeddings()(b["input_ids"])
        adv = model(inputs_embeds=e + m.delta, attention_mask=b["attention_mask"]).logits
        clean = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert math.isclose(out.loss.item(), F.cross_entropy(adv, b["labels"]).item(), rel_tol=1e-6)
    assert out.loss.item() > F.cross_entropy(clean, b["labels"]).item()
    logs = m.step_logs()
    assert set(logs) == {"pgd/delta_norm", "pgd/adv_loss_gain"} and logs["pgd/adv_loss_gain"] > 0


@pytest.mark.parametrize("bad", [{"adv_steps": 0}, {"norm_type": "inf"}, {"adv_lr": -1}, {"adv_max_norm": -0.1}])
def test_pgd_bad_options_are_user_errors(bad):
    with pytest.raises(UserError, match="method\\."):
        method("pgd", **bad)


def test_freelb_plus_plus_arm_is_freelb_with_textdefenders_setting():
    cfg = make_cfg(["arm=freelb_plus_plus"])
    assert cfg.method._target_ == "robustft.methods.freelb.FreeLB" and cfg.tag == "freelb_plus_plus"
    assert (cfg.method.adv_steps, cfg.method.adv_lr, cfg.method.adv_init_mag, cfg.method.adv_max_norm) == (10, 0.03, 0.05, 0.0)
    for arm, target in (("pgd", "robustft.methods.pgd.PGD"), ("freelb", "robustft.methods.freelb.FreeLB")):
        assert make_cfg([f"arm={arm}"]).method._target_ == target


# --- TAVAT ----------------------------------------------------------------------------------------------
def official_tavat(model, b, vocab, steps, adv_lr, init_mag, max_norm):
    """LinyangLee/Token-Aware-VAT token_vat.py's adversarial loop, in plain torch (mean loss, one GPU)."""
    emb, input_ids = model.get_input_embeddings(), b["input_ids"]
    input_ids_flat = input_ids.contiguous().view(-1)
    embeds_init = emb(input_ids)
    input_mask = b["attention_mask"].float()
    input_lengths = torch.sum(input_mask, 1)
    bs, seq_len = embeds_init.size(0), embeds_init.size(1)
    mag = init_mag / torch.sqrt(input_lengths * embeds_init.size(-1))
    delta_lb = torch.zeros_like(embeds_init).uniform_(-1, 1) * input_mask.unsqueeze(2)
    delta_lb = (delta_lb * mag.view(-1, 1, 1)).detach()
    delta_tok = torch.index_select(vocab, 0, input_ids_flat).view(bs, seq_len, -1).detach()
    delta_tok = delta_tok / torch.norm(delta_tok.view(-1, delta_tok.size(-1))).view(-1, 1, 1)
    tr_loss = 0.0
    for astep in range(steps):
        delta_lb.requires_grad_()
        delta_tok.requires_grad_()
        logits = model(inputs_embeds=embeds_init + delta_lb + delta_tok, attention_mask=b["attention_mask"]).logits
        loss = F.cross_entropy(logits, b["labels"])
        tr_loss += loss.item()
        loss.backward(retain_graph=True)
        if astep == steps - 1:
            delta_tok = delta_tok.detach()
            vocab = vocab.index_put_((input_ids_flat,), delta_tok.view(-1, delta_tok.size(-1)), True)
            break
        delta_lb_grad, delta_tok_grad = delta_lb.grad.clone().detach(), delta_tok.grad.clone().detach()
        denorm_lb = torch.clamp(torch.norm(delta_lb_grad.view(bs, -1), dim=1).view(-1, 1, 1), min=1e-8)
        denorm_tok = torch.clamp(torch.norm(delta_tok_grad, dim=-1), min=1e-8).view(bs, seq_len, 1)
        delta_lb = (delta_lb + adv_lr * delta_lb_grad / denorm_lb).detach()
        delta_tok = (delta_tok + adv_lr * delta_tok_grad / denorm_tok).detach()
        delta_norm_tok = torch.norm(delta_tok, p=2, dim=-1).detach()
        mean_norm_tok, _ = torch.max(delta_norm_tok, dim=-1, keepdim=True)
        delta_tok = delta_tok * (delta_norm_tok / mean_norm_tok).view(bs, seq_len, 1)
        total_delta = delta_tok + delta_lb
        delta_norm = torch.norm(total_delta.view(bs, -1).float(), p=2, dim=1).detach()
        exceed_mask = (delta_norm > max_norm).float()
        reweights = (max_norm / delta_norm * exceed_mask + (1 - exceed_mask)).view(-1, 1, 1)
        delta_lb, delta_tok = (delta_lb * reweights).detach(), (delta_tok * reweights).detach()
    return grads_of(model), tr_loss, vocab


@pytest.mark.parametrize(("arch", "steps", "max_norm"), [("bert", 3, 0.3), ("roberta", 2, 0.5), ("bert", 1, 0.5)])
def test_tavat_gradients_and_vocabulary_equal_the_official_loop(arch, steps, max_norm):
    b = batch(4, 7, 2)
    b["input_ids"][1, :3] = b["input_ids"][2, :3]  # repeated tokens: the vocabulary accumulates per occurrence
    model = tiny_model(arch, dropout=0.1)
    m = method("tavat", model, adv_steps=steps, adv_lr=0.3, adv_init_mag=0.2, adv_max_norm=max_norm)
    vocab0 = m.vocab.clone()
    torch.manual_seed(5)
    out = m.training_step(model, b)
    (out.loss / 2).backward()  # two micro-batches per optimizer step
    got = grads_of(model)
    ref = tiny_model(arch, dropout=0.1)
    torch.manual_seed(5)  # the same dropout masks: both draw delta_lb, then one mask set per forward
    expected, loss, vocab = official_tavat(ref, b, vocab0.clone(), steps, 0.3, 0.2, max_norm)
    assert got.keys() == expected.keys()
    worst = max((2 * got[k] - expected[k]).abs().max().item() for k in got)
    assert worst < 1e-6, worst
    assert abs(out.loss.item() - loss) < 1e-5
    assert (m.vocab - vocab).abs().max().item() < 1e-6 and not torch.equal(m.vocab, vocab0)
    size = m.delta.flatten(1).norm(dim=1)
    assert steps == 1 or (size <= max_norm * (1 + 1e-5)).all()


def test_tavat_vocabulary_is_resume_state_and_the_method_refuses_data_parallel(monkeypatch):
    model = tiny_model("bert")
    m = method("tavat", model)
    m.training_step(model, batch(4, 7, 0))
    fresh = method("tavat", tiny_model("bert"))
    assert not torch.equal(fresh.vocab, m.vocab)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.vocab, m.vocab)
    monkeypatch.setattr("robustft.distributed.world_size", lambda: 2)
    with pytest.raises(UserError, match="method=tavat .* one process only"):
        method("tavat", tiny_model("bert"))


# --- InfoBERT -------------------------------------------------------------------------------------------
def official_infonce(critic, x_samples, y_samples):
    """AI-secure/InfoBERT MI_estimators.py InfoNCE.forward (its unused random_index left out)."""
    sample_size = y_samples.shape[0]
    x_tile = x_samples.unsqueeze(0).repeat((sample_size, 1, 1))
    y_tile = y_samples.unsqueeze(1).repeat((1, sample_size, 1))
    t0 = critic.F_func(torch.cat([x_samples, y_samples], dim=-1))
    t1 = critic.F_func(torch.cat([x_tile, y_tile], dim=-1))
    return t0.mean() - (t1.logsumexp(dim=1).mean() - np.log(sample_size))


def official_infobert(model, critic, b, gen, k, adv_lr, init_mag, alpha, beta, cl, ch, chunk, seed):
    """local_robust_trainer.py `_adv_training_step` (l2, version 6), in plain torch; its global torch.randint
    draws from `gen` here, and torch's RNG is replayed where its clear_mask keeps the dropout masks."""
    emb, mask = model.get_input_embeddings(), b["attention_mask"]
    embeds_init = emb(b["input_ids"])
    input_mask = mask.float()
    lengths = input_mask.sum(1).long().tolist()
    delta = torch.zeros_like(embeds_init).uniform_(-1, 1) * input_mask.unsqueeze(2)
    delta = (delta * (init_mag / torch.sqrt(input_mask.sum(1) * embeds_init.size(-1))).view(-1, 1, 1)).detach()
    rng = torch.get_rng_state()
    for astep in range(k):
        torch.set_rng_state(rng)
        delta.requires_grad_()
        outputs = model(inputs_embeds=delta + embeds_init, attention_mask=mask, output_hidden_states=True)
        loss = F.cross_entropy(outputs.logits, b["labels"]) / k
        hs0, last = outputs.hidden_states[0], outputs.hidden_states[-1]
        y = torch.cat([hs0[i, :n] for i, n in enumerate(lengths)])  # CLUBv2 version 3
        random_index = torch.randint(y.shape[0], (y.shape[0],), generator=gen).long()
        loss = loss + ((y - y[random_index]) ** 2 / 2.0).sum(-1).mean() * beta / k
        loss.backward(retain_graph=True)
        delta_grad = delta.grad.clone().detach()
        local, glob = [], []
        for i, n in enumerate(lengths):  # feature_ranking
            _, ind = torch.sort(torch.norm(delta_grad[i, :n], dim=1), stable=True)
            for r in range(math.ceil(n * cl), math.ceil(n * ch)):
                local.append(hs0[i, ind[r].item()])
                glob.append(last[i, 0])
        perm = np.arange(len(local))
        np.random.RandomState(seed).shuffle(perm)  # sklearn.utils.shuffle(random_state=seed)
        local, glob = [local[j] for j in perm], [glob[j] for j in perm]
        bounds = [official_infonce(critic, torch.stack(local[i:i + chunk]), torch.stack(glob[i:i + chunk]))
                  for i in range(0, len(local), chunk)]
        (-torch.stack(bounds).mean() * alpha / k).backward()
        if astep == k - 1:
            break
        denorm = torch.clamp(torch.norm(delta_grad.view(delta_grad.size(0), -1), dim=1).view(-1, 1, 1), min=1e-8)
        delta = (delta + adv_lr * delta_grad / denorm).detach()
        embeds_init = emb(b["input_ids"])
    return {**grads_of(model), **{f"critic.{n}": p.grad.clone() for n, p in critic.named_parameters()}}


def infobert_ctx(chunk: int):
    from robustft.methods.base import TrainContext

    trainer = OmegaConf.create({"log_every": 1, "save_every": 1000, "batch_size": chunk})
    return TrainContext(task=OmegaConf.create({"is_regression": False}), trainer=trainer, device=torch.device("cpu"),
                        seed=7)


@pytest.mark.parametrize(("arch", "k"), [("bert", 3), ("roberta", 2)])
def test_infobert_gradients_equal_the_official_adv_training_step(arch, k):
    b = batch(4, 7, 4)
    opts = {"adv_steps": k, "adv_lr": 0.3, "adv_init_mag": 0.5, "alpha": 0.5, "beta": 0.05}  # terms that matter
    m = method("infobert", **opts)
    model = tiny_model(arch, dropout=0.1)
    m.setup(model, infobert_ctx(4))
    critic = copy.deepcopy(m.critic)
    torch.manual_seed(5)
    out = m.training_step(model, b)
    (out.loss / 2).backward()
    got = {**grads_of(model), **{f"critic.{n}": p.grad.clone() for n, p in m.critic.named_parameters()}}
    ref = tiny_model(arch, dropout=0.1)
    torch.manual_seed(5)
    expected = official_infobert(ref, critic, b, club_generator(7, 0, 0), k, 0.3, 0.5, 0.5, 0.05, 0.5, 0.9, 4, 7)
    assert got.keys() == expected.keys()
    worst = max((2 * got[key] - expected[key]).abs().max().item() for key in got)
    assert worst < 1e-6, worst
    assert all(expected[key].abs().sum() > 0 for key in expected if key.startswith("critic."))  # the bound trains it
    logs = m.step_logs()
    assert logs["infobert/upper_bound"] > 0 and set(logs) == set(m.log_names)


def test_infobert_feature_choice_permutation_and_resume_state():
    grad = torch.tensor([[[3.0], [1.0], [2.0], [5.0], [4.0], [9.0]]]).expand(2, -1, -1).clone()
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    example, pos = robust_features(grad, mask, 0.5, 0.9)
    # n=5: ranks ceil(2.5)=3, 4 of the sorted norms (1, 2, 3, 4, 5) -> positions 4, 3; n=6: ranks 3, 4, 5 -> 4, 3, 5
    assert example.tolist() == [0, 0, 1, 1, 1] and pos.tolist() == [4, 3, 4, 3, 5]
    perm = np.arange(11)
    np.random.RandomState(7).shuffle(perm)  # what the reference above does
    assert sklearn_shuffle(np.arange(11), random_state=7).tolist() == perm.tolist()
    m = method("infobert")
    model = tiny_model("bert")
    m.setup(model, infobert_ctx(4))
    m.training_step(model, batch(4, 7, 0))
    fresh = method("infobert")
    fresh.setup(tiny_model("bert"), infobert_ctx(4))
    fresh.load_state_dict(m.state_dict())
    assert fresh.calls == m.calls == 1  # the next micro-batch's CLUB generator: club_generator(seed, 1, rank)
    assert all(torch.equal(a, b) for a, b in zip(fresh.critic.parameters(), m.critic.parameters()))
