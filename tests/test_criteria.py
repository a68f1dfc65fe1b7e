"""Criteria registry and losses: names match the schema, losses match independent formulas."""

import pytest
import torch
import torch.nn.functional as F

from hfprune.config import schema
from hfprune.criteria import CRITERIA, get_criterion
from hfprune.errors import ConfigError


def test_registry_matches_schema_enum():
    assert list(CRITERIA) == schema()["properties"]["criteria"]["items"]["enum"]


def test_unknown_criterion_and_option_fail_clearly():
    with pytest.raises(ConfigError, match="unknown criterion 'taylor'"):
        get_criterion("taylor")
    with pytest.raises(ConfigError, match="criterion_options.taylor_kd: unknown option"):
        get_criterion("taylor_kd", {"beta": 1})


def _logits():
    torch.manual_seed(0)
    return torch.randn(2, 5, 17) * 3, torch.randint(0, 17, (2, 5)), torch.randn(2, 5, 17) * 3


def test_position_losses_match_reference_formulas():
    logits, labels, teacher = _logits()
    labels[0, 1] = -100
    ce = F.cross_entropy(logits.reshape(-1, 17), labels.reshape(-1), reduction="none", ignore_index=-100)
    torch.testing.assert_close(get_criterion("taylor_ce").position_loss(logits, labels), ce.view(2, 5))
    p = logits.softmax(-1)
    torch.testing.assert_close(get_criterion("taylor_entropy").position_loss(logits, labels),
                               -(p * p.log()).sum(-1))
    top = logits.topk(4, dim=-1).values.softmax(-1)
    torch.testing.assert_close(get_criterion("taylor_entropy_topk", {"k": 4}).position_loss(logits, labels),
                               -(top * top.log()).sum(-1))
    a, t = 0.3, 0.5
    kd = get_criterion("taylor_kd", {"alpha": a, "temperature": t}).position_loss(logits, labels, teacher)
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher / t, -1), log_target=True,
                  reduction="none").sum(-1)
    torch.testing.assert_close(kd, (1 - a) * ce.view(2, 5) + a * kl)


def test_kd_is_sdmprune_loss():
    """SDMPrune (prune/distill_prune.py): kl_div(log_softmax(student), softmax(teacher / t), batchmean) / seq_len,
    the teacher softened only, no t^2: our mean over positions of the per-position KL equals it."""
    logits, labels, teacher = _logits()
    t = 0.2
    one = logits[:1]
    want = F.kl_div(F.log_softmax(one, dim=-1), F.softmax(teacher[:1] / t, dim=-1), reduction="batchmean") / 5
    kd = get_criterion("taylor_kd", {"alpha": 1.0, "temperature": t})
    torch.testing.assert_close(kd.position_loss(one, labels[:1], teacher[:1]).mean(), want)


def test_kl_gradient_is_not_zero_at_the_dense_point():
    """Only the teacher is softened: with student == teacher weights, dKL/dz = softmax(z) - softmax(z / t) != 0."""
    logits, labels, _ = _logits()
    logits = logits.double()
    student = logits.clone().requires_grad_(True)
    kd = get_criterion("taylor_kd", {"alpha": 1.0, "temperature": 0.2})
    (g,) = torch.autograd.grad(kd.position_loss(student, labels, logits).sum(), student)
    torch.testing.assert_close(g, logits.softmax(-1) - (logits / 0.2).softmax(-1))
    assert g.abs().max() > 1e-2
    # at t = 1 it is zero, as with both sides softened
    kd1 = get_criterion("taylor_kd", {"alpha": 1.0, "temperature": 1.0})
    (g,) = torch.autograd.grad(kd1.position_loss(student, labels, logits).sum(), student)
    assert g.abs().max() < 1e-13


def test_kd_preprune_keep_is_checked():
    with pytest.raises(ConfigError, match="preprune_keep"):
        get_criterion("taylor_kd", {"preprune_keep": {"neurons": 5}})


def test_fisher_squares_and_taylor_takes_abs():
    x = torch.tensor([-2.0, 0.5])
    assert torch.equal(get_criterion("fisher").token_scores(x), torch.tensor([4.0, 0.25]))
    assert torch.equal(get_criterion("taylor_ce").token_scores(x), torch.tensor([2.0, 0.5]))


@pytest.mark.parametrize("name", ["taylor_ce", "taylor_entropy", "fisher"])
@pytest.mark.parametrize("rows", [10, 70])  # 70 rows: more than one in-place row block
def test_closed_form_logit_gradients_equal_autograd(name, rows):
    """The scorer uses `logit_gradient_` instead of autograd where a criterion defines it: they must agree."""
    crit = get_criterion(name)
    g = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, 300, generator=g, dtype=torch.float64) * 4
    labels = torch.randint(0, 300, (rows,), generator=g)
    x = logits.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(crit.position_loss(x[None], labels[None]).sum(), x)
    work = logits.clone()
    got = crit.logit_gradient_(work, labels)
    assert got.data_ptr() == work.data_ptr()  # in place: no second [n, V] tensor
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
