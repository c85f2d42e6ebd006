"""train.py's attention equals a naive masked softmax, forward and backward, in fp32.

The reference builds the scores matrix and masks it by hand: position i sees position j
when j <= i (causal) and i - j < window (the sliding window of short layers).
"""

from __future__ import annotations

import math
from types import ModuleType

import pytest
import torch

from gpt_pretrain import load_train

SEQ = 24
DIM, HEAD_DIM = 32, 8


@pytest.fixture(scope="module")
def train() -> ModuleType:
    return load_train()


def _naive(
    attention: torch.nn.Module, train: ModuleType, x: torch.Tensor, rope: tuple
) -> torch.Tensor:
    batch, seq, dim = x.shape
    shape = (batch, seq, attention.heads, attention.head_dim)
    q = train.rms_norm(train.apply_rotary(attention.c_q(x).view(shape), *rope))
    k = train.rms_norm(train.apply_rotary(attention.c_k(x).view(shape), *rope))
    v = attention.c_v(x).view(shape)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(attention.head_dim)
    i = torch.arange(seq)[:, None]
    j = torch.arange(seq)[None, :]
    visible = (j <= i) & (i - j < attention.window)
    weights = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    y = (weights @ v).transpose(1, 2).reshape(batch, seq, dim)
    return attention.c_proj(y)


@pytest.mark.parametrize("window", [SEQ, 7, 1], ids=["full-causal", "sliding", "self-only"])
def test_attention_matches_the_naive_reference(train: ModuleType, window: int) -> None:
    torch.manual_seed(0)
    attention = train.Attention(DIM, HEAD_DIM, window, SEQ).float()
    cos, sin = train.rotary_tables(SEQ, HEAD_DIM)
    x = torch.randn(2, SEQ, DIM, requires_grad=True)
    upstream = torch.randn(2, SEQ, DIM)

    fast = attention(x, cos, sin)
    fast_grads = torch.autograd.grad(fast, [x, *attention.parameters()], upstream)
    slow = _naive(attention, train, x, (cos, sin))
    slow_grads = torch.autograd.grad(slow, [x, *attention.parameters()], upstream)

    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    for fast_grad, slow_grad in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-4, atol=1e-5)


def test_the_reference_is_not_blind_to_the_window(train: ModuleType) -> None:
    # A sliding layer's output differs from a full one's: the masks really differ.
    torch.manual_seed(0)
    full = train.Attention(DIM, HEAD_DIM, SEQ, SEQ).float()
    sliding = train.Attention(DIM, HEAD_DIM, 7, SEQ).float()
    sliding.load_state_dict(full.state_dict())
    cos, sin = train.rotary_tables(SEQ, HEAD_DIM)
    x = torch.randn(1, SEQ, DIM)
    assert not torch.allclose(full(x, cos, sin), sliding(x, cos, sin), atol=1e-3)


@pytest.mark.parametrize("window", [7, 1], ids=["sliding", "self-only"])
def test_flex_attention_matches_the_naive_reference(train: ModuleType, window: int) -> None:
    # The block-sparse path CUDA runs compiled; forward only, since FlexAttention has no
    # backward pass on the CPU (its gradients are torch's own kernels).
    torch.manual_seed(0)
    attention = train.Attention(DIM, HEAD_DIM, window, SEQ).float()
    attention.use_flex_attention()
    assert attention.block_mask is not None
    cos, sin = train.rotary_tables(SEQ, HEAD_DIM)
    x = torch.randn(2, SEQ, DIM)
    with torch.no_grad():
        torch.testing.assert_close(
            attention(x, cos, sin), _naive(attention, train, x, (cos, sin)), rtol=1e-5, atol=1e-5
        )


def test_full_layers_keep_sdpa_under_flex(train: ModuleType) -> None:
    attention = train.Attention(DIM, HEAD_DIM, SEQ, SEQ)
    attention.use_flex_attention()
    assert attention.block_mask is None
