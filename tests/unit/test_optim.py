"""fairseq's schedules and label-smoothed loss."""
import math

import pytest
import torch

from pyramidion_ds.config import load_config
from pyramidion_ds.engine import label_smoothed_nll_loss, lr_lambda


def test_polynomial_decay_with_warmup():
    cfg = load_config(None, ["--train.lr", "1.0", "--train.warmup_updates", "10", "--train.max_update", "110",
                             "--train.end_learning_rate", "0.1"]).train
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_inverse_sqrt():
    cfg = load_config(None, ["--train.lr_scheduler", "inverse_sqrt", "--train.warmup_updates", "4"]).train
    f = lr_lambda(cfg)
    assert f(3) == pytest.approx(1.0) and f(15) == pytest.approx(math.sqrt(4 / 16))


def test_label_smoothing_zero_is_cross_entropy():
    logits = torch.randn(2, 5, 11)
    target = torch.randint(4, 11, (2, 5))
    target[1, 3:] = 1
    loss, nll = label_smoothed_nll_loss(logits, target, 0.0, ignore_index=1)
    ref = torch.nn.functional.cross_entropy(logits.view(-1, 11), target.view(-1), ignore_index=1, reduction="sum")
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5) and nll.item() == pytest.approx(ref.item(), rel=1e-5)


def test_label_smoothing_matches_fairseq_formula():
    logits = torch.randn(1, 3, 7)
    target = torch.tensor([[4, 5, 6]])
    eps = 0.1
    loss, nll = label_smoothed_nll_loss(logits, target, eps, ignore_index=1)
    lprobs = torch.log_softmax(logits, -1).view(-1, 7)
    nll_ref = -lprobs.gather(1, target.view(-1, 1)).sum()
    smooth_ref = -lprobs.sum()
    eps_i = eps / 6
    assert loss.item() == pytest.approx(((1 - eps - eps_i) * nll_ref + eps_i * smooth_ref).item(), rel=1e-5)
