"""A few optimizer steps of train.py's model on fixed global batches, then a validation
pass: run plainly (one process) or under torchrun (every rank takes its slice of each
global batch). Rank 0 saves the losses, val_bpb and final weights to argv[1].

    python ddp_worker.py OUT DATA_DIR
    python -m torch.distributed.run --nproc_per_node=2 ddp_worker.py OUT DATA_DIR
"""

from __future__ import annotations

import os
import sys

import torch

from gpt_pretrain import load_train

GLOBAL_ROWS = 8  # rows of one global batch
MICRO_ROWS = 2  # rows per micro-batch on every rank
SEQ = 16
STEPS = 3
EVAL_BATCHES = 5  # odd: two ranks score unequal shares


def main(out: str, data_dir: str) -> None:
    train = load_train()
    train.DEPTH, train.MODEL_DIM, train.HEAD_DIM, train.WINDOW_PATTERN = 2, 32, 8, "SL"
    prepare = sys.modules["prepare"]
    prepare.MAX_SEQ_LEN = SEQ
    prepare.EVAL_TOKENS = EVAL_BATCHES * MICRO_ROWS * SEQ

    os.environ["SKYLAB_DATA_DIR"] = data_dir  # where evaluate_bpb looks
    ranks = train.Ranks.from_env()
    device = torch.device("cpu")
    train.start_distributed(ranks, device)
    tokenizer = prepare.Tokenizer.load(data_dir)
    torch.manual_seed(ranks.rank)  # ranks disagree until the broadcast
    model = train.GPT(tokenizer.vocab_size, SEQ)
    if ranks.world_size > 1:
        train.broadcast_parameters(model)
    optimizers = train.build_optimizers(model)

    rows = GLOBAL_ROWS // ranks.world_size
    accum_steps = rows // MICRO_ROWS
    generator = torch.Generator().manual_seed(7)
    losses = []
    for step in range(STEPS):
        tokens = torch.randint(tokenizer.vocab_size, (GLOBAL_ROWS, SEQ + 1), generator=generator)
        mine = tokens[ranks.rank * rows : (ranks.rank + 1) * rows]
        batches = iter((chunk[:, :-1], chunk[:, 1:]) for chunk in mine.split(MICRO_ROWS))
        train.apply_schedule(optimizers, progress=step / STEPS, step=step)
        loss = train.train_step(model, optimizers, batches, accum_steps, train.nullcontext(), ranks)
        value = loss.item()
        if ranks.world_size > 1:
            (value,) = train.mean_over_ranks([value], device)
        losses.append(value)

    model.eval()
    val_bpb = prepare.evaluate_bpb(model, tokenizer, MICRO_ROWS)
    if ranks.main:
        torch.save(dict(losses=losses, val_bpb=val_bpb, state=model.state_dict()), out)
    if ranks.world_size > 1:
        train.dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
