"""This process's place in a multi-process run (torchrun, accelerate launch, ``tunelab train --nproc``).

Every process trains; only the main one prepares the run folder, writes files and
prints. Steps that fill a shared cache (building a built-in model, tokenizing data)
run on the main process first, so the others find the cache filled.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


class Processes:
    def __init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self._state = None
        if self.world_size > 1:
            import torch
            from accelerate import PartialState

            # Joins the process group: NCCL on GPUs; without one, accelerate only forms a
            # CPU group (gloo) when asked to.
            self._state = PartialState(cpu=not torch.cuda.is_available())

    @property
    def is_main(self) -> bool:
        return self._state is None or self._state.is_main_process

    def barrier(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        if self._state is None:
            yield
        else:
            with self._state.main_process_first():
                yield

    def print(self, *args, **kwargs) -> None:
        if self.is_main:
            print(*args, **kwargs)
