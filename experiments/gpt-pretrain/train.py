"""Pretrain a small GPT for a fixed time budget and report val_bpb. This file is the one
the research strategies edit; prepare.py (data, tokenizer, evaluation) is frozen.

    python train.py            # cwd = this directory; data from `python prepare.py`
    torchrun --standalone --nproc_per_node=8 train.py      # data-parallel on 8 GPUs

Environment: SKYLAB_TIME_BUDGET (training seconds, default 300), SKYLAB_DEVICE (cuda,
mps, cpu, ...; overrides DEVICE), SKYLAB_DATA_DIR (the prepared data). Under torchrun
(RANK, LOCAL_RANK, WORLD_SIZE set) every rank trains on its own share of the documents,
gradients are averaged across ranks, and TOTAL_BATCH_SIZE is the global batch, so one
step means the same on 1 and N GPUs; rank 0 alone prints.

Output: one progress line per step (at most one per PROGRESS_SECONDS once the first
steps are printed), in the format of skylab_trainer/progress.py, then a summary block
starting with a `---` line. Exit status 1 when the loss turns NaN or explodes.
"""

from __future__ import annotations

import time

T_START = time.time()  # wall clock of the whole run, imports included

# Imports follow the clock on purpose: total_seconds includes them.
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import AbstractContextManager, closing, nullcontext  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from prepare import MAX_SEQ_LEN, TIME_BUDGET, Tokenizer, evaluate_bpb, make_dataloader  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention  # noqa: E402

# ---------------------------------------------------------------------------
# Hyperparameters: module-level literals, one per line (a sweep tool rewrites them)
# ---------------------------------------------------------------------------

# Model
DEPTH = 8  # transformer blocks
MODEL_DIM = 512  # residual stream width, a multiple of HEAD_DIM
HEAD_DIM = 128  # width of one attention head; heads = MODEL_DIM // HEAD_DIM
MLP_RATIO = 4  # MLP hidden width = MLP_RATIO * MODEL_DIM
WINDOW_PATTERN = "SSSL"  # attention span per layer, cycled: L = full context, S = short
SHORT_WINDOW_FRAC = 0.5  # span of an S layer as a fraction of the context
ROPE_BASE = 10000.0  # rotary embedding base frequency
LOGIT_SOFTCAP = 15.0  # logits = cap * tanh(logits / cap)
X0_INIT = 0.1  # initial weight of the embedding re-injected before every block

# Optimisation
TOTAL_BATCH_SIZE = 2**19  # tokens per optimizer step (gradient accumulation fills it)
DEVICE_BATCH_SIZE = 64  # rows per forward/backward pass (and per evaluation batch)
MATRIX_LR = 0.04  # Muon learning rate of the 2-D block matrices
EMBEDDING_LR = 0.6  # AdamW learning rate of the token embedding (scaled by dim)
UNEMBEDDING_LR = 0.004  # AdamW learning rate of the output head (scaled by dim)
SCALAR_LR = 0.5  # AdamW learning rate of the per-layer residual scalars
WEIGHT_DECAY = 0.0  # decoupled weight decay of the Muon matrices
ADAM_BETA1 = 0.8  # AdamW first-moment decay
ADAM_BETA2 = 0.95  # AdamW second-moment decay
MUON_MOMENTUM = 0.95  # Muon Nesterov momentum, reached after MUON_MOMENTUM_WARMUP steps
MUON_MOMENTUM_START = 0.85  # Muon momentum at step 0
MUON_MOMENTUM_WARMUP = 300  # steps of linear momentum warmup
NS_STEPS = 5  # Newton-Schulz iterations that orthogonalise a Muon update
WARMUP_RATIO = 0.0  # share of the time budget spent ramping the learning rates up
WARMDOWN_RATIO = 0.5  # share of the time budget, at the end, decaying them to FINAL_LR_FRAC
FINAL_LR_FRAC = 0.0  # learning-rate multiplier reached at the end of the budget
GRAD_CLIP = 0.0  # max gradient norm of the AdamW parameters (0 = off)

# Run
SEED = 42  # torch RNG seed; env SKYLAB_SEED overrides (each run of a trial has its own)
DEVICE = "auto"  # auto picks cuda > mps > cpu; env SKYLAB_DEVICE overrides
COMPILE = True  # torch.compile the model on CUDA (never on CPU/MPS)
FLEX_ATTENTION = True  # compiled: sliding-window layers use FlexAttention, not a dense mask
TIMING_SKIP_STEPS = 10  # first CUDA steps (compile, autotune) not counted against TIME_BUDGET
PROGRESS_SECONDS = 1.0  # at most one progress line per this many seconds after step 10
MAX_LOSS = 100.0  # a training loss above this (or NaN) aborts the run
CUDA_PEAK_FLOPS = 989.5e12  # assumed peak for MFU on CUDA: H100 SXM dense bf16
OTHER_PEAK_FLOPS = 1e12  # assumed peak for MFU on CPU/MPS (indicative only)


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(seq_len: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [seq_len, head_dim/2] of rotary position embeddings."""
    inv_freq = ROPE_BASE ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + d/2) of x [B, T, H, D] by position-dependent angles."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos = cos[: x.size(1), None, :].to(x.dtype)
    sin = sin[: x.size(1), None, :].to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def layer_windows(depth: int, seq_len: int) -> list[int]:
    """Attention span of every layer from WINDOW_PATTERN; the last layer sees everything."""
    pattern = WINDOW_PATTERN.upper()
    if not pattern or set(pattern) - {"S", "L"}:
        raise ValueError(f"WINDOW_PATTERN {WINDOW_PATTERN!r}: use the letters S and L")
    spans = {"L": seq_len, "S": max(1, min(round(SHORT_WINDOW_FRAC * seq_len), seq_len))}
    windows = [spans[pattern[i % len(pattern)]] for i in range(depth)]
    windows[-1] = seq_len
    return windows


class Attention(nn.Module):
    def __init__(self, dim: int, head_dim: int, window: int, seq_len: int):
        super().__init__()
        self.heads = dim // head_dim
        self.head_dim = head_dim
        self.window = window
        self.c_q = nn.Linear(dim, dim, bias=False)
        self.c_k = nn.Linear(dim, dim, bias=False)
        self.c_v = nn.Linear(dim, dim, bias=False)
        self.c_proj = nn.Linear(dim, dim, bias=False)
        # A sliding window needs an explicit mask: True = may attend (causal and near).
        mask = None
        if window < seq_len:
            pos = torch.arange(seq_len)
            distance = pos[:, None] - pos[None, :]
            mask = (distance >= 0) & (distance < window)
        self.register_buffer("window_mask", mask, persistent=False)
        # FlexAttention's block-sparse form of the same mask (see use_flex_attention): it
        # skips the blocks outside the window, where SDPA with a dense mask computes
        # every score.
        self.block_mask: BlockMask | None = None

    def use_flex_attention(self) -> None:
        if self.window_mask is None:
            return
        seq_len, window = self.window_mask.size(0), self.window

        def causal_window(
            batch: torch.Tensor, head: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
        ) -> torch.Tensor:
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

        device = self.window_mask.device
        self.block_mask = create_block_mask(causal_window, None, None, seq_len, seq_len, device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        shape = (batch, seq, self.heads, self.head_dim)
        q = rms_norm(apply_rotary(self.c_q(x).view(shape), cos, sin))  # QK-norm
        k = rms_norm(apply_rotary(self.c_k(x).view(shape), cos, sin))
        v = self.c_v(x).view(shape)
        q, k, v = (t.transpose(1, 2).to(v.dtype) for t in (q, k, v))
        if self.window_mask is None or seq <= self.window:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.block_mask is not None and seq == self.block_mask.seq_lengths[0]:
            y = flex_attention(q, k, v, block_mask=self.block_mask)
        else:
            mask = self.window_mask[:seq, :seq]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(batch, seq, dim))


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.c_fc = nn.Linear(dim, MLP_RATIO * dim, bias=False)
        self.c_proj = nn.Linear(MLP_RATIO * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, dim: int, head_dim: int, window: int, seq_len: int):
        super().__init__()
        self.attn = Attention(dim, head_dim, window, seq_len)
        self.mlp = MLP(dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(rms_norm(x), cos, sin)
        return x + self.mlp(rms_norm(x))


class GPT(nn.Module):
    """Decoder-only transformer: RoPE, parameter-free RMSNorm, QK-norm, ReLU^2 MLP,
    untied head, per-layer residual scalars and sliding-window layers."""

    def __init__(self, vocab_size: int, seq_len: int):
        super().__init__()
        if MODEL_DIM % HEAD_DIM or HEAD_DIM % 2:
            raise ValueError(f"MODEL_DIM {MODEL_DIM} must be a multiple of an even HEAD_DIM")
        self.windows = layer_windows(DEPTH, seq_len)
        self.wte = nn.Embedding(vocab_size, MODEL_DIM)
        self.blocks = nn.ModuleList(
            Block(MODEL_DIM, HEAD_DIM, window, seq_len) for window in self.windows
        )
        self.lm_head = nn.Linear(MODEL_DIM, vocab_size, bias=False)
        # Before block i: x = resid_scales[i] * x + x0_scales[i] * embedding.
        self.resid_scales = nn.Parameter(torch.ones(DEPTH))
        self.x0_scales = nn.Parameter(torch.full((DEPTH,), X0_INIT))
        cos, sin = rotary_tables(seq_len, HEAD_DIM)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    def use_flex_attention(self) -> None:
        """Sliding-window layers attend through FlexAttention, on the device the model is
        on. Only under torch.compile: uncompiled, it materialises every score, and its
        backward pass does not run on the CPU."""
        for block in self.blocks:
            block.attn.use_flex_attention()

    @torch.no_grad()
    def _init_weights(self) -> None:
        bound = math.sqrt(3 / MODEL_DIM)  # uniform with std 1/sqrt(dim)
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(linear.weight, -bound, bound)
            # Zero output projections: every block starts as the identity.
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"
    ) -> torch.Tensor:
        """Logits without targets; else the cross-entropy (nats) with that reduction.

        reduction="none" gives one loss per target token, flattened in target order: the
        contract prepare.evaluate_bpb relies on.
        """
        x = x0 = rms_norm(self.wte(idx))
        for i, block in enumerate(self.blocks):
            x = self.resid_scales[i] * x + self.x0_scales[i] * x0
            x = block(x, self.rope_cos, self.rope_sin)
        logits = self.lm_head(rms_norm(x)).float()
        logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction
        )

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per weight of every matmul (embedding lookup
        excluded) plus attention's QK^T and AV, 12 * heads * head_dim * span per layer,
        where span is the layer's window: a full square per token, no causal discount
        (the usual PaLM/nanochat convention, so numbers compare with theirs)."""
        matmul_params = sum(p.numel() for p in self.blocks.parameters() if p.dim() == 2)
        matmul_params += self.lm_head.weight.numel()
        heads = MODEL_DIM // HEAD_DIM
        attention = sum(12 * heads * HEAD_DIM * min(w, seq_len) for w in self.windows)
        return 6 * matmul_params + attention


# ---------------------------------------------------------------------------
# Optimizer: Muon for the 2-D block matrices, AdamW for the rest
# ---------------------------------------------------------------------------


def orthogonalize(g: torch.Tensor, steps: int) -> torch.Tensor:
    """Approximate U V^T of g = U S V^T (batched over dim 0) with a quintic
    Newton-Schulz iteration, tuned (Keller Jordan's coefficients) to push every
    singular value towards 1 quickly rather than exactly."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16() if g.is_cuda else g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


class Optimizer:
    """Parameter groups (dicts with "params" and "lr") plus per-parameter state. Not
    torch.optim.Optimizer: its constructor imports torch._dynamo, which costs tens of
    seconds before the first step on a small CPU and buys nothing here."""

    def __init__(self, groups: list[dict[str, Any]]):
        self.param_groups = groups
        self.state: dict[nn.Parameter, dict[str, Any]] = {}
        for group in groups:
            group["initial_lr"] = group["lr"]

    def step(self) -> None:
        raise NotImplementedError


class AdamW(Optimizer):
    """Adam with decoupled weight decay and bias correction."""

    def __init__(self, groups: list[dict[str, Any]], betas: tuple[float, float], eps: float):
        super().__init__(groups)
        self.betas = betas
        self.eps = eps

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        for group in self.param_groups:
            lr, decay = group["lr"], group.get("weight_decay", 0.0)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state.get(p)
                if state is None:
                    state = dict(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                    self.state[p] = state
                state["step"] += 1
                state["m"].lerp_(p.grad, 1 - beta1)
                state["v"].lerp_(p.grad.square(), 1 - beta2)
                m_scale = 1 - beta1 ** state["step"]
                v_scale = 1 - beta2 ** state["step"]
                denom = (state["v"] / v_scale).sqrt_().add_(self.eps)
                p.mul_(1 - lr * decay)
                p.addcdiv_(state["m"], denom, value=-lr / m_scale)


class Muon(Optimizer):
    """Nesterov momentum, orthogonalised per matrix. Same-shape matrices are updated as
    one batch, and their momentum buffers live stacked (state[p]["buffer"] is a view),
    so a step stacks only the gradients."""

    def __init__(self, groups: list[dict[str, Any]]):
        super().__init__(groups)
        self._stacks: dict[tuple[int, ...], torch.Tensor] = {}

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            by_shape: dict[torch.Size, list[nn.Parameter]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            for shape, params in by_shape.items():
                self._update(params, shape, group)

    def _buffers(self, params: list[nn.Parameter]) -> torch.Tensor:
        """The stacked momentum buffers of PARAMS, carried over from any earlier stack."""
        key = tuple(id(p) for p in params)
        stack = self._stacks.get(key)
        if stack is None:
            stack = torch.stack(
                [
                    self.state[p]["buffer"] if p in self.state else torch.zeros_like(p)
                    for p in params
                ]
            )
            for p, view in zip(params, stack, strict=True):
                self.state[p] = dict(buffer=view)
            self._stacks[key] = stack
        return stack

    def _update(self, params: list[nn.Parameter], shape: torch.Size, group: dict) -> None:
        momentum = group["momentum"]
        grads = torch.stack([p.grad for p in params])
        buffers = self._buffers(params)
        buffers.lerp_(grads, 1 - momentum)
        update = orthogonalize(grads.lerp_(buffers, momentum), NS_STEPS)
        # Equal RMS per entry whatever the aspect ratio.
        update *= max(1.0, shape[0] / shape[1]) ** 0.5
        lr = group["lr"]
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_add_(params, list(update.unbind(0)), alpha=-lr)


def build_optimizers(model: GPT) -> list[Optimizer]:
    dim_scale = (MODEL_DIM / 768) ** -0.5  # embedding/head learning rates were tuned at 768
    adam = AdamW(
        [
            dict(params=[model.wte.weight], lr=EMBEDDING_LR * dim_scale),
            dict(params=[model.lm_head.weight], lr=UNEMBEDDING_LR * dim_scale),
            dict(params=[model.resid_scales, model.x0_scales], lr=SCALAR_LR),
        ],
        betas=(ADAM_BETA1, ADAM_BETA2),
        eps=1e-10,
    )
    matrices = [p for p in model.blocks.parameters() if p.dim() == 2]
    muon = Muon(
        [dict(params=matrices, lr=MATRIX_LR, momentum=MUON_MOMENTUM, weight_decay=WEIGHT_DECAY)]
    )
    return [adam, muon]


def lr_multiplier(progress: float) -> float:
    """Learning-rate factor at PROGRESS (training seconds / TIME_BUDGET)."""
    if WARMUP_RATIO > 0 and progress < WARMUP_RATIO:
        return max(progress / WARMUP_RATIO, 0.01)
    if WARMDOWN_RATIO <= 0 or progress < 1 - WARMDOWN_RATIO:
        return 1.0
    remaining = max(1 - progress, 0.0) / WARMDOWN_RATIO
    return FINAL_LR_FRAC + (1 - FINAL_LR_FRAC) * remaining


def apply_schedule(optimizers: list[Optimizer], progress: float, step: int) -> float:
    lrm = lr_multiplier(progress)
    warm = min(step / MUON_MOMENTUM_WARMUP, 1.0) if MUON_MOMENTUM_WARMUP > 0 else 1.0
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if isinstance(optimizer, Muon):
                group["momentum"] = MUON_MOMENTUM_START + warm * (
                    MUON_MOMENTUM - MUON_MOMENTUM_START
                )
    return lrm


# ---------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job; rank 0 of 1 without torchrun."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Ranks:
        env = os.environ
        return cls(
            int(env.get("RANK") or 0),
            int(env.get("LOCAL_RANK") or 0),
            int(env.get("WORLD_SIZE") or 1),
        )


def pick_device(ranks: Ranks) -> torch.device:
    choice = os.environ.get("SKYLAB_DEVICE") or DEVICE
    if choice == "auto":
        if torch.cuda.is_available():
            choice = "cuda"
        elif torch.backends.mps.is_available():
            choice = "mps"
        else:
            choice = "cpu"
    device = torch.device(choice)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ranks.local_rank)  # one GPU per rank
    return device


def start_distributed(ranks: Ranks, device: torch.device) -> None:
    """Join the torchrun job: NCCL between GPUs, gloo on the CPU."""
    if ranks.world_size == 1:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
    else:
        dist.init_process_group(backend="gloo")


def broadcast_parameters(model: nn.Module) -> None:
    """Every rank starts from rank 0's weights (seeded alike, but made sure)."""
    for tensor in model.state_dict().values():
        dist.broadcast(tensor, src=0)


def average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """Replace every gradient with its mean over the ranks: one all-reduce of all of
    them flattened together, after the last micro-batch."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    chunks = flat.split([g.numel() for g in grads])
    torch._foreach_copy_(grads, [chunk.view_as(g) for chunk, g in zip(chunks, grads, strict=True)])


def mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Per-rank figures averaged, so every rank takes the same decisions from them."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()


def train_step(
    model: nn.Module,
    optimizers: list[Optimizer],
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    accum_steps: int,
    autocast: AbstractContextManager[object],
    ranks: Ranks,
) -> torch.Tensor:
    """One optimizer step over ACCUM_STEPS micro-batches per rank (gradients averaged
    across ranks). Returns this rank's mean micro-batch loss, left on the device:
    reading it is the step's one host sync, the caller's."""
    total = torch.zeros((), device=next(model.parameters()).device)
    for _ in range(accum_steps):
        inputs, targets = next(batches)
        with autocast:
            loss = model(inputs, targets)
        (loss / accum_steps).backward()
        total += loss.detach()
    params = list(model.parameters())
    if ranks.world_size > 1:
        average_gradients(params, ranks.world_size)
    if GRAD_CLIP > 0:
        adam_params = [p for group in optimizers[0].param_groups for p in group["params"]]
        nn.utils.clip_grad_norm_(adam_params, GRAD_CLIP)
    for optimizer in optimizers:
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return total / accum_steps


def autocast_for(device: torch.device) -> AbstractContextManager[object]:
    """bf16 autocast on CUDA; CPU and MPS train in fp32."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def progress_line(
    step: int,
    loss: float,
    lrm: float,
    dt: float,
    tokens_per_second: float,
    mfu: float,
    done: float,
    left: float,
    epoch: int,
) -> str:
    """The format skylab_trainer/progress.py parses (epoch is an extra field)."""
    return (
        f"step {step:05d} | loss {loss:.6f} | lrm {lrm:.2f} | dt {dt * 1000:.0f}ms | "
        f"tok/s {tokens_per_second:,.0f} | mfu {mfu:.1f}% | done {done:.1f}% | left {left:.0f}s"
        f" | epoch {epoch}"
    )


def summary_block(stats: dict[str, str]) -> str:
    """autoresearch's layout: values from column 18, one space after a longer name."""
    return "\n".join(["---", *(f"{name + ':':<17} {value}" for name, value in stats.items())])


def fail(message: str, ranks: Ranks | None = None) -> None:
    if ranks is None or ranks.main:
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def main() -> None:
    ranks = Ranks.from_env()
    torch.manual_seed(int(os.environ.get("SKYLAB_SEED", SEED)))
    device = pick_device(ranks)
    start_distributed(ranks, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = autocast_for(device)
    say = print if ranks.main else lambda *args, **kwargs: None

    tokenizer = Tokenizer.load()
    tokens_per_pass = DEVICE_BATCH_SIZE * MAX_SEQ_LEN * ranks.world_size
    if TOTAL_BATCH_SIZE % tokens_per_pass:
        fail(
            f"TOTAL_BATCH_SIZE {TOTAL_BATCH_SIZE} is not a multiple of {tokens_per_pass} "
            f"(DEVICE_BATCH_SIZE x MAX_SEQ_LEN x {ranks.world_size} ranks)",
            ranks,
        )
    accum_steps = TOTAL_BATCH_SIZE // tokens_per_pass

    raw_model = GPT(tokenizer.vocab_size, MAX_SEQ_LEN).to(device)
    if ranks.world_size > 1:
        broadcast_parameters(raw_model)
    num_params = sum(p.numel() for p in raw_model.parameters())
    flops_per_token = raw_model.flops_per_token(MAX_SEQ_LEN)
    compiled = COMPILE and device.type == "cuda"
    if compiled and FLEX_ATTENTION:
        raw_model.use_flex_attention()
    model = torch.compile(raw_model, dynamic=False) if compiled else raw_model
    optimizers = build_optimizers(raw_model)
    skip_steps = TIMING_SKIP_STEPS if device.type == "cuda" else 0
    peak_flops = (CUDA_PEAK_FLOPS if device.type == "cuda" else OTHER_PEAK_FLOPS) * ranks.world_size
    say(
        f"device {device.type} x {ranks.world_size} | params {num_params / 1e6:.2f}M | "
        f"vocab {tokenizer.vocab_size} | budget {TIME_BUDGET:.0f}s | "
        f"accumulation {accum_steps} x {DEVICE_BATCH_SIZE * MAX_SEQ_LEN:,} tokens per rank",
        flush=True,
    )

    loader = make_dataloader(
        tokenizer,
        DEVICE_BATCH_SIZE,
        MAX_SEQ_LEN,
        "train",
        device,
        rank=ranks.rank,
        world_size=ranks.world_size,
    )
    with closing(loader):
        batches = ((inputs, targets) for inputs, targets, _ in loader)
        training_seconds = 0.0
        first_step_seconds = 0.0
        smooth_loss = 0.0
        step = 0
        last_print = 0.0
        while True:
            t0 = time.perf_counter()
            progress = min(training_seconds / TIME_BUDGET, 1.0)
            lrm = apply_schedule(optimizers, progress, step)
            loss = train_step(model, optimizers, batches, accum_steps, autocast, ranks)
            loss_value = loss.item()  # waits for the step to finish
            dt = time.perf_counter() - t0
            if ranks.world_size > 1:
                loss_value, dt = mean_over_ranks([loss_value, dt], device)
            if not math.isfinite(loss_value) or loss_value > MAX_LOSS:
                fail(f"training loss {loss_value} at step {step}: diverged, aborting", ranks)
            step += 1
            if step == 1:
                first_step_seconds = time.time() - T_START
            if step > skip_steps:
                training_seconds += dt
            smooth_loss = 0.9 * smooth_loss + 0.1 * loss_value
            debiased = smooth_loss / (1 - 0.9**step)
            tokens_per_second = TOTAL_BATCH_SIZE / dt
            mfu = 100 * flops_per_token * tokens_per_second / peak_flops
            finished = training_seconds >= TIME_BUDGET
            now = time.perf_counter()
            if step <= 10 or finished or now - last_print >= PROGRESS_SECONDS:
                last_print = now
                done = 100 * min(training_seconds / TIME_BUDGET, 1.0)
                left = max(TIME_BUDGET - training_seconds, 0.0)
                line = progress_line(
                    step, debiased, lrm, dt, tokens_per_second, mfu, done, left, loader.epoch
                )
                say(line, flush=True)
            if finished:
                break
        data_wait_seconds = loader.wait_seconds

    eval_started = time.perf_counter()
    model.eval()
    with autocast:
        val_bpb = evaluate_bpb(model, tokenizer, DEVICE_BATCH_SIZE)
    eval_seconds = time.perf_counter() - eval_started
    peak_vram_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    if ranks.world_size > 1:
        peak = torch.tensor([peak_vram_mb, data_wait_seconds], device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        peak_vram_mb, data_wait_seconds = peak.tolist()
        dist.destroy_process_group()
    total_tokens = step * TOTAL_BATCH_SIZE
    counted_tokens = max(step - skip_steps, 0) * TOTAL_BATCH_SIZE
    tokens_per_second = counted_tokens / max(training_seconds, 1e-9)
    mfu_percent = 100 * flops_per_token * tokens_per_second / peak_flops
    stats = {
        "val_bpb": f"{val_bpb:.6f}",
        "training_seconds": f"{training_seconds:.1f}",
        "total_seconds": f"{time.time() - T_START:.1f}",
        "peak_vram_mb": f"{peak_vram_mb:.1f}",
        "mfu_percent": f"{mfu_percent:.2f}",
        "total_tokens_M": f"{total_tokens / 1e6:.1f}",
        "num_steps": f"{step}",
        "num_params_M": f"{num_params / 1e6:.1f}",
        "depth": f"{DEPTH}",
        "tokens_per_second": f"{tokens_per_second:.0f}",
        "first_step_seconds": f"{first_step_seconds:.1f}",
        "eval_seconds": f"{eval_seconds:.1f}",
        "data_wait_seconds": f"{data_wait_seconds:.1f}",
        "world_size": f"{ranks.world_size}",
    }
    say(summary_block(stats), flush=True)


if __name__ == "__main__":
    main()
