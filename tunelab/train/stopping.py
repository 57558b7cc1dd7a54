"""Stop a run cleanly on SIGINT/SIGTERM: finish the current step, save a checkpoint, say how to resume.

A second SIGINT stops at once (the last complete checkpoint stays usable:
checkpoints are written atomically).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

from transformers import TrainerCallback

from tunelab.errors import RunInterrupted

__all__ = ["GracefulStop", "RunInterrupted", "stop_on_signals"]


class GracefulStop(TrainerCallback):
    """Turns a received signal into "save a checkpoint and stop" at the end of the current step."""

    def __init__(self) -> None:
        self.signal_number: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if args.world_size > 1:
            # Every process must stop after the same step (the checkpoint is a collective save), and
            # a signal may reach the processes at different steps or only some of them.
            import torch
            import torch.distributed as dist

            received = torch.tensor([self.signal_number or 0], device=args.device)
            dist.all_reduce(received, op=dist.ReduceOp.MAX)
            self.signal_number = int(received.item()) or None
        if self.signal_number is not None:
            control.should_save = True
            control.should_training_stop = True


@contextlib.contextmanager
def stop_on_signals(stopper: GracefulStop) -> Iterator[None]:
    """Route SIGINT and SIGTERM to ``stopper`` while the block runs (main thread only)."""

    def handle(number, frame):
        if stopper.signal_number == signal.SIGINT and number == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        stopper.signal_number = number

    previous = {}
    try:
        for number in (signal.SIGINT, signal.SIGTERM):
            previous[number] = signal.signal(number, handle)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
