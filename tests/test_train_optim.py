"""The optimizers of experiments/gpt-pretrain/train.py against torch's own and the maths."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
from torch import nn

from gpt_pretrain import load_train


@pytest.fixture(scope="module")
def train() -> ModuleType:
    return load_train()


def _params(seed: int) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=generator)) for shape in [(5, 3), (7,)]]


def _set_grads(params: list[nn.Parameter], step: int) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch(train: ModuleType, weight_decay: float) -> None:
    ours, reference = _params(0), _params(0)
    betas, eps = (0.8, 0.95), 1e-10
    optimizer = train.AdamW(
        [dict(params=ours[:1], lr=0.05, weight_decay=weight_decay), dict(params=ours[1:], lr=0.2)],
        betas=betas,
        eps=eps,
    )
    expected = torch.optim.AdamW(
        [
            dict(params=reference[:1], lr=0.05, weight_decay=weight_decay),
            dict(params=reference[1:], lr=0.2, weight_decay=0.0),
        ],
        betas=betas,
        eps=eps,
    )
    for step in range(6):
        _set_grads(ours, step)
        _set_grads(reference, step)
        optimizer.step()
        expected.step()
    for mine, theirs in zip(ours, reference, strict=True):
        torch.testing.assert_close(mine.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)


def test_adamw_skips_parameters_without_gradients(train: ModuleType) -> None:
    params = _params(1)
    before = [p.detach().clone() for p in params]
    optimizer = train.AdamW([dict(params=params, lr=0.1)], betas=(0.9, 0.95), eps=1e-8)
    params[0].grad = torch.ones_like(params[0])
    optimizer.step()
    assert not torch.equal(params[0].detach(), before[0])
    assert torch.equal(params[1].detach(), before[1])


def test_orthogonalize_pushes_singular_values_towards_one(train: ModuleType) -> None:
    generator = torch.Generator().manual_seed(3)
    # A poorly conditioned batch of tall and wide matrices.
    for shape in [(2, 64, 32), (2, 32, 64)]:
        scales = torch.logspace(-1, 1, min(shape[1:]))  # condition number 100
        g = torch.randn(shape, generator=generator)
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        conditioned = u @ torch.diag_embed(scales.expand(shape[0], -1)) @ vh
        singular = torch.linalg.svdvals(train.orthogonalize(conditioned, 5))
        # Keller Jordan's coefficients trade exactness for speed: roughly [0.7, 1.2].
        assert singular.min() > 0.5 and singular.max() < 1.3, singular
        assert train.orthogonalize(conditioned, 5).shape == conditioned.shape


def test_muon_step_is_lr_times_orthogonalised_nesterov_momentum(train: ModuleType) -> None:
    generator = torch.Generator().manual_seed(4)
    params = [nn.Parameter(torch.randn(8, 4, generator=generator)) for _ in range(2)]
    start = [p.detach().clone() for p in params]
    lr, momentum = 0.02, 0.9
    optimizer = train.Muon([dict(params=params, lr=lr, momentum=momentum, weight_decay=0.0)])
    grads = [torch.randn(8, 4, generator=generator) for _ in params]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    optimizer.step()
    for p, g, p0 in zip(params, grads, start, strict=True):
        buffer = (1 - momentum) * g  # first step: the buffer starts at zero
        nesterov = g.lerp(buffer, momentum)
        update = train.orthogonalize(nesterov[None], train.NS_STEPS)[0] * (8 / 4) ** 0.5
        torch.testing.assert_close(p.detach(), p0 - lr * update, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(optimizer.state[p]["buffer"], buffer)
