"""method=dne: the update against TextDefender's `DNETrainer.train` + `WeightedEmbedding.forward` written out, the
neighbourhoods against its `CachedWordSearcher(second_order=True)`, the Dirichlet draws' moments, the weights on
the simplex (before and after the ascent, so every virtual embedding is in its set's hull), the ensemble prediction,
and bad options. Exact resume: tests/test_method_contract.py; 2 ranks: tests/test_ddp_methods.py (slow)."""

from __future__ import annotations

import copy
import os
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustft.errors import UserError
from robustft.methods.dne import DNE, hull_sets
from tests.test_ascc import tiny_setup
from tests.test_bad_inputs import isolated_process_state, one_error_line, robustft, statuses  # noqa: F401
from tests.tiny_models import one_thread  # noqa: F401  (module fixture)

DATA = Path(os.environ.get("ROBUSTFT_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
pytestmark = pytest.mark.skipif(not (DATA / "word_substitution" / "counterfitted_neighbors.json").exists(),
                                reason="needs the data bundle's counter-fitted lists")
OPTIONS = dict(path="word_substitution/counterfitted_neighbors.json", dir_alpha=1.0, dir_decay=0.5, nbr_num=50,
               adv_steps=3, adv_step_size=10.0, ensemble_size=5, ensemble_method="mean", predict_batch_size=1)


def setup(**options):
    m = DNE("dne", **{**OPTIONS, **options})
    return m, *tiny_setup(m, seed=3)


def official(model, b, syn, valid, coeff0, steps, step_size, pad_slots):
    """TextDefender's DNE step: `DNETrainer.train` (a forward + `loss.backward()` on the Dirichlet point, then
    `adv_iteration` more with `set_adv_mode(True)`, gradients summed) with `WeightedEmbedding.forward`'s weights
    (log(c + 1e-6) - max; then last_fw + step * last_bw / (||last_bw|| + 1e-6) - max; softmax; sum over the row).
    Rows cut to the batch's largest set (`nbr_tokens[:, :max_nbr_num]`). pad_slots=True: the official's rows, padded
    with token 0 ([PAD]) at weight ~1e-6; False: robustft's, off-set slots at -inf."""
    emb = model.get_input_embeddings()
    width = int(valid.sum(-1).max())
    nbr, c0, v = syn[..., :width], coeff0[..., :width], valid[..., :width]
    if pad_slots:
        nbr = torch.where(v, nbr, 0)
    fw = bw = coeff = None
    total = 0.0
    for k in range(steps + 1):
        z = (c0 + 1e-6).log() if k == 0 else fw + step_size * (bw / (torch.norm(bw, dim=-1, keepdim=True) + 1e-6))
        if not pad_slots:
            z = z.masked_fill(~v, -torch.inf)
        z = (z - z.max(-1, keepdim=True)[0]).detach().requires_grad_()
        fw = z.detach()
        coeff = F.softmax(z, dim=-1)
        embedded = (emb(nbr) * coeff.unsqueeze(-1)).sum(-2)
        logits = model(inputs_embeds=embedded, attention_mask=b["attention_mask"],
                       token_type_ids=b["token_type_ids"]).logits
        loss = torch.mean(nn.CrossEntropyLoss(reduction="none")(logits, b["labels"]))
        loss.backward()
        bw = z.grad
        total += loss.item()
    return total, coeff.detach()


def grad_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p.grad - r.grad).abs().max().item() for p, r in zip(a.parameters(), b.parameters())
               if p.grad is not None)


def test_update_equals_the_official_step(one_thread):  # noqa: F811
    """Dropout on: the official redraws it at every forward, and so does this; same seed, same masks."""
    m, model, b = setup()
    ref, ref_padded = copy.deepcopy(model), copy.deepcopy(model)
    syn, valid = m.slots(b)
    torch.manual_seed(7)
    out = m.training_step(model, b)
    out.loss.backward()
    for r, padded in ((ref, False), (ref_padded, True)):
        torch.manual_seed(7)
        coeff0 = m.dirichlet(b["input_ids"], valid)  # the same draw (and RNG consumption) as the step's
        assert torch.equal(coeff0, m.start)
        total, coeff = official(r, b, syn, valid, coeff0, 3, 10.0, padded)
        width = coeff.shape[-1]
        if not padded:
            assert abs(out.loss.item() - total) < 1e-6  # measured 1.2e-7
            assert (m.coeff[..., :width] - coeff).abs().max().item() < 1e-5  # 5.4e-7
            assert (m.coeff[..., width:] == 0).all()
            assert grad_diff(model, r) < 1e-6  # 1.5e-8
        else:  # the official's [PAD] slots, ~1e-6 weight each: loss 7.7e-7, gradients 1.1e-5 apart
            assert abs(out.loss.item() - total) < 1e-3
            assert grad_diff(model, r) < 1e-3
    assert model.training


def test_weights_stay_on_the_simplex_and_embeddings_in_the_hull(one_thread):  # noqa: F811
    m, model, b = setup(adv_steps=3)
    syn, valid = m.slots(b)
    assert (valid.sum(-1) > 9).any()  # some sets hold 2-hop neighbours (a 1-hop list has at most 8)
    m.training_step(model, b)
    assert not torch.allclose(m.start, m.coeff)  # the ascent moved the weights
    emb = model.get_input_embeddings().weight.detach()
    fixed = ~valid[..., 1:].any(-1)  # tokens without a set keep their own embedding
    lo = torch.where(valid.unsqueeze(-1), emb[syn], torch.inf).amin(-2)
    hi = torch.where(valid.unsqueeze(-1), emb[syn], -torch.inf).amax(-2)
    for p in (m.start, m.coeff):
        assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones_like(p[..., 0]), atol=1e-6)
        assert (p[~valid] == 0).all()
        assert (p[fixed][:, 0] == 1).all()
        point = (p.unsqueeze(-1) * emb[syn]).sum(-2)
        assert ((point >= lo - 1e-6) & (point <= hi + 1e-6)).all()  # a convex combination: inside the bounding box


class Vocab:
    def __init__(self, words):
        self.vocab = {w: i for i, w in enumerate(words)}

    def get_vocab(self):
        return self.vocab


def official_two_hop(table, vocab):
    """TextDefender's `CachedWordSearcher(file, vocab_list=t2i, second_order=True)` lists, as written there."""
    filtered = defaultdict(list)
    for k in table:
        if k in vocab:
            for v in table[k]:
                if v in vocab:
                    filtered[k].append(v)
    nbrs = defaultdict(list)
    for k in filtered:
        for v in filtered[k]:
            nbrs[k].append(v)
            if v not in filtered:
                continue
            for vv in filtered[v]:
                if vv != k and vv not in nbrs[k]:
                    nbrs[k].append(vv)
    return dict(filtered), dict(nbrs)


def test_neighbourhoods_are_the_official_two_hop_sets():
    table = {"good": ["fine", "great", "nice"], "fine": ["good", "okay", "great"], "great": ["good", "huge"],
             "okay": ["fine"], "bad": ["awful", "oov"], "awful": ["bad", "terrible"], "oov": ["bad"]}
    tok = Vocab(["[PAD]", "good", "fine", "great", "nice", "okay", "huge", "bad", "awful", "terrible", "lone"])
    vocab = tok.get_vocab()
    sets, sizes, first = hull_sets(tok, table, nbr_num=50)
    first_lists, both = official_two_hop(table, vocab)
    for word, i in vocab.items():
        row = sets[i, : sizes[i]].tolist()
        assert row[0] == i and len(set(row)) == len(row)  # the word first, no word twice
        if word not in both:
            assert sizes[i] == 1 and first[i] == 1
            continue
        assert set(row[1:]) == {vocab[w] for w in both[word]}  # the same neighbourhood as the official
        assert row[1 : first[i]] == [vocab[w] for w in first_lists[word]]  # 1-hop words first, in file order
    # "good": the official row interleaves each 1-hop word's neighbours and repeats "great" (2-hop via "fine",
    # then 1-hop), so its first 1 + 3 slots (dir_alpha) are good, fine, okay (2-hop), great ...
    assert both["good"] == ["fine", "okay", "great", "great", "huge", "nice"]
    # ... here the 1-hop words come first, then the 2-hop ones
    g = vocab["good"]
    assert sets[g, : sizes[g]].tolist() == [vocab[w] for w in ["good", "fine", "great", "nice", "okay", "huge"]]
    small, small_sizes, small_first = hull_sets(tok, table, nbr_num=3)
    assert small.shape[1] == 3 and small_sizes[g] == 3 and small_first[g] == 3


def test_dirichlet_draws_have_the_concentrations_moments(one_thread):  # noqa: F811
    """1-hop slots at dir_alpha, 2-hop at dir_alpha * dir_decay: E[c_j] = a_j / A, Var[c_0] = a_0 (A - a_0) / (A^2 (A + 1))."""
    m = DNE("dne", **{**OPTIONS, "dir_alpha": 1.0, "dir_decay": 0.5})
    m.first = torch.tensor([1, 2])  # token 1: itself + one 1-hop neighbour, the rest 2-hop
    ids = torch.ones(20000, 1, dtype=torch.long)
    valid = torch.tensor([True, True, True, True, True, False]).expand(20000, 1, 6)
    torch.manual_seed(0)
    c = m.dirichlet(ids, valid).squeeze(1)
    a = torch.tensor([1.0, 1.0, 0.5, 0.5, 0.5, 0.0])
    total = a.sum()
    assert (c[:, 5] == 0).all()
    assert (c.mean(0) - a / total).abs().max() < 0.01
    var0 = a[0] * (total - a[0]) / (total**2 * (total + 1))
    assert abs(c[:, 0].var() / var0 - 1) < 0.05


def test_prediction_is_the_mean_over_seeded_dirichlet_points(one_thread):  # noqa: F811
    m, model, b = setup(ensemble_size=5)
    model.eval()
    state = torch.get_rng_state()
    got = m.predict(model, b)
    assert torch.equal(torch.get_rng_state(), state)  # prediction leaves training's RNG alone
    assert torch.equal(m.predict(model, b), got)  # seeded: the same every call
    rows = {k: v.repeat_interleave(5, 0) for k, v in b.items() if k != "labels"}
    syn, valid = m.slots(rows)
    torch.manual_seed(m.seed)
    c = m.dirichlet(rows["input_ids"], valid)
    z = (c + 1e-6).log().masked_fill(~valid, -torch.inf)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        logits = model(inputs_embeds=(F.softmax(z, -1).unsqueeze(-1) * emb[syn]).sum(-2),
                       attention_mask=rows["attention_mask"], token_type_ids=rows["token_type_ids"]).logits
    want = F.normalize(logits.view(2, 5, -1), dim=-1).mean(1)  # the official 'logits' ensemble (sklearn normalize)
    assert (got - want).abs().max().item() < 1e-5
    assert m.metrics({}) == {"ensemble/size": 5.0}


@pytest.mark.parametrize("bad", [{"dir_alpha": 0.0}, {"dir_decay": -1.0}, {"nbr_num": 1}, {"adv_steps": -1},
                                 {"adv_step_size": -0.1}, {"ensemble_size": 0}, {"ensemble_method": "max"}])
def test_bad_options_are_one_line_errors(bad):
    with pytest.raises(UserError) as e:
        DNE("dne", **{**OPTIONS, **bad})
    message = str(e.value)
    assert "\n" not in message and message.startswith("method.") and f"{next(iter(bad))}=" in message


def test_bad_option_from_the_command_line(monkeypatch, capsys, tmp_path):
    code, err = robustft(monkeypatch, capsys, "method=dne", "method.dir_alpha=0", f"hydra.run.dir={tmp_path}/run")
    one_error_line(code, err, "method.dir_alpha=0")
    assert "completed" not in statuses(tmp_path)
