"""tunelab: fine-tuning recipe runner for LLMs."""

import logging
import sys
from pathlib import Path

__version__ = "0.1.0"


def _stop_shadowing_kernels() -> None:
    """Keep a source checkout's root off ``sys.path``.

    The checkout's ``kernels/`` folder is tunelab's own (importable as ``tunelab.kernels``).
    When Python runs from the checkout root (``python -m pytest``, ``python -m tunelab``),
    that folder would shadow the PyPI ``kernels`` package that transformers imports.
    Only a checkout is touched (it has a pyproject.toml beside the folder); an installed
    tunelab never is.
    """
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "kernels" / "__init__.py").is_file():
        sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != root]
        stale = sys.modules.get("kernels")
        if stale is not None and str(getattr(stale, "__file__", "")).startswith(str(root)):
            del sys.modules["kernels"]


_stop_shadowing_kernels()


def _quiet_bitsandbytes_cpu_kernel_notice() -> None:
    """Drop bitsandbytes' "Failed to load CPU gemm_4bit_forward" warning, printed on import.

    On CPUs with avx512_bf16, importing bitsandbytes (which PEFT does) asks the hub for an
    inference kernel and logs a warning when it cannot have it. That kernel only serves
    bitsandbytes' repacked eval-time layout, which tunelab switches off
    (``tunelab.models.load.keep_4bit_layout``), so the line would only mislead.
    """
    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(keep)


_quiet_bitsandbytes_cpu_kernel_notice()
