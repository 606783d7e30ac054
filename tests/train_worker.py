"""Runs ``albert-scale train`` with a fault injected: the loss of chosen steps is made NaN.

Usage (alone, or under ``deepspeed``):
    python tests/train_worker.py --nan-steps 3,4 -- TRAIN ARGS ...

The model's forward pass is wrapped so that every micro-batch of the listed steps (1-based, counted by
forward calls in training mode) returns a NaN loss; everything else is the real command.
"""

from __future__ import annotations

import argparse
import sys

from albert_scale import train
from albert_scale.model import AlbertForPreTraining


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nan-steps", required=True, help="comma-separated 1-based steps")
    parser.add_argument("--micro-batches", type=int, required=True, help="forward calls per step on a rank")
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args([a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    nan_steps = {int(s) for s in args.nan_steps.split(",")}
    forward = AlbertForPreTraining.forward
    calls = {"n": 0}

    def poisoned(self, *a, **kw):
        output = forward(self, *a, **kw)
        if self.training:
            step = calls["n"] // args.micro_batches + 1
            calls["n"] += 1
            if step in nan_steps:
                output.loss = output.loss * float("nan")
        return output

    AlbertForPreTraining.forward = poisoned
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    return train.main(rest, prog="albert-scale train")


if __name__ == "__main__":
    sys.exit(main())
