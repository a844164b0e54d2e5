"""Optimizer groups, fairseq's schedules and label-smoothed loss."""

import math

import pytest
import torch

from pyramidion_ds.config import load_config
from pyramidion_ds.engine import label_smoothed_nll_loss, lr_lambda, make_optimizer, make_scheduler, param_groups
from pyramidion_ds.model import PyramidionModel


def test_polynomial_decay_with_warmup():
    cfg = load_config(
        None,
        [
            "--train.lr",
            "1.0",
            "--train.warmup_updates",
            "10",
            "--train.max_update",
            "110",
            "--train.end_learning_rate",
            "0.1",
        ],
    ).train
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_inverse_sqrt():
    cfg = load_config(None, ["--train.lr_scheduler", "inverse_sqrt", "--train.warmup_updates", "4"]).train
    f = lr_lambda(cfg)
    assert f(3) == pytest.approx(1.0) and f(15) == pytest.approx(math.sqrt(4 / 16))


def test_fixed_schedule_warms_up_then_holds():
    cfg = load_config(None, ["--train.lr_scheduler", "fixed", "--train.warmup_updates", "4"]).train
    f = lr_lambda(cfg)
    assert [f(s) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


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


def debug_model(cfg):
    torch.manual_seed(0)
    return PyramidionModel(cfg.model)


def test_scorers_learn_at_their_own_lr_through_the_schedule():
    cfg = load_config(
        None,
        [
            "--model.vocab_size",
            "50",
            "--train.lr",
            "0.01",
            "--train.scorer_lr_scale",
            "0.1",
            "--train.warmup_updates",
            "3",
            "--train.max_update",
            "8",
            "--train.end_learning_rate",
            "0.001",
        ],
    )
    model = debug_model(cfg)
    optimizer, _ = make_optimizer(model, cfg.train, offload=False)
    scheduler = make_scheduler(optimizer, cfg.train)
    names = {id(p): name for name, p in model.named_parameters()}
    group_names = [{names[id(p)] for p in group["params"]} for group in optimizer.param_groups]
    is_scorer = [all(n.startswith("encoder.scorers.") for n in g) for g in group_names]
    assert all(group_names) and not is_scorer[0]  # no empty group; group 0 (the logged lr) is the model's
    assert {n for g, scorer in zip(group_names, is_scorer, strict=True) if scorer for n in g} == {
        n for n in names.values() if n.startswith("encoder.scorers.")
    }
    assert not any(
        n.startswith("encoder.scorers.")
        for g, scorer in zip(group_names, is_scorer, strict=True)
        if not scorer
        for n in g
    )
    # the decay split holds inside the scorers' groups: weights decay, biases do not
    groups = zip(optimizer.param_groups, group_names, is_scorer, strict=True)
    assert sorted(
        (g["weight_decay"], sorted({n.rsplit(".", 1)[1] for n in names_})) for g, names_, scorer in groups if scorer
    ) == [(0.0, ["bias"]), (cfg.train.weight_decay, ["weight"])]
    for step in range(10):
        lrs = [g["lr"] for g in optimizer.param_groups]
        for lr, scorer in zip(lrs, is_scorer, strict=True):
            assert lr == pytest.approx(lrs[0] * (0.1 if scorer else 1.0)), step
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.001)  # the end of the decay


def test_scorer_lr_scale_one_keeps_the_two_groups_of_old():
    cfg = load_config(None, ["--model.vocab_size", "50"])
    model = debug_model(cfg)
    groups = param_groups(model, 0.01, 1e-3)
    assert [(g["weight_decay"], g["lr"]) for g in groups] == [(0.01, 1e-3), (0.0, 1e-3)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
