"""This process's place in a multi-process run (torchrun, accelerate launch, ``tunelab train --nproc``).

Every process trains; only the main one prepares the run folder, writes files and
prints. Steps that fill a shared cache (building a built-in model, tokenizing data)
run on the main process first, so the others find the cache filled.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from tunelab.config.schema import DistributedConfig
from tunelab.launch.strategy import prepare_environment, process_group_backend, uses_cpu_mode


class Processes:
    def __init__(self, distributed: DistributedConfig) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self._state = None
        if self.world_size > 1 or (distributed.strategy == "deepspeed" and "LOCAL_RANK" in os.environ):
            from accelerate import PartialState

            # Joins the process group: NCCL on GPUs; without one, accelerate only forms a CPU
            # group (gloo) when asked to, and DeepSpeed forms its own (see tunelab.launch.strategy).
            prepare_environment(distributed)
            self._state = PartialState(cpu=uses_cpu_mode(distributed), backend=process_group_backend(distributed))

    @property
    def is_main(self) -> bool:
        return self._state is None or self._state.is_main_process

    def barrier(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()

    def finish(self) -> None:
        """Wait for every process, then leave the process group.

        The main process still evaluates and writes after training; a process that exits
        meanwhile would take the group down under it (DeepSpeed aborts such a process).
        """
        if self._state is not None:
            self._state.wait_for_everyone()
            self._state.destroy_process_group()

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
