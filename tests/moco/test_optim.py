from __future__ import annotations

import math

import pytest
import torch

from moco.optim import LARS, lr_at, momentum_at


def test_cosine_schedule_with_warmup():
    assert lr_at(0, 100, warmup_steps=10, base=1.0, schedule="cosine") == pytest.approx(0.1)
    assert lr_at(9, 100, warmup_steps=10, base=1.0, schedule="cosine") == pytest.approx(1.0)
    assert lr_at(10, 100, warmup_steps=10, base=1.0, schedule="cosine") == pytest.approx(1.0)
    assert lr_at(55, 100, warmup_steps=10, base=1.0, schedule="cosine") == pytest.approx(0.5)
    assert lr_at(100, 100, warmup_steps=10, base=1.0, schedule="cosine") == pytest.approx(0.0)


def test_step_schedule_of_v1():
    values = [lr_at(s, 100, warmup_steps=0, base=1.0, schedule="step") for s in (0, 59, 60, 79, 80, 99)]
    assert values == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_momentum_schedules():
    assert momentum_at(50, 100, 0.99, cosine=False) == 0.99
    assert momentum_at(0, 100, 0.99, cosine=True) == pytest.approx(0.99)
    assert momentum_at(50, 100, 0.99, cosine=True) == pytest.approx(0.995)
    assert momentum_at(100, 100, 0.99, cosine=True) == pytest.approx(1.0)


def test_lars_scales_matrices_by_the_trust_ratio_and_leaves_vectors_alone():
    weight = torch.nn.Parameter(torch.full((2, 2), 2.0))
    bias = torch.nn.Parameter(torch.ones(2))
    weight.grad = torch.full((2, 2), 0.5)
    bias.grad = torch.full((2,), 0.5)
    LARS([weight, bias], lr=1.0, weight_decay=0.0, momentum=0.0, trust_coefficient=0.01).step()
    # trust = 0.01 * |w| / |g| = 0.01 * 4 / 1 = 0.04; update = 0.04 * 0.5
    torch.testing.assert_close(weight.detach(), torch.full((2, 2), 2.0 - 0.02))
    torch.testing.assert_close(bias.detach(), torch.full((2,), 0.5))
    assert math.isfinite(float(weight.detach().sum()))
