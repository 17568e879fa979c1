"""Where the Triton kernels run in tests: natively on CUDA, else in Triton's CPU interpreter.

Triton enables its interpreter only when TRITON_INTERPRET=1 is set before Triton is first imported, so a test
module calls `triton_device()` before importing anything that imports Triton (the engine imports it only on
first use of the Triton backend).
"""

from __future__ import annotations

import os
import sys

import torch


def triton_device() -> str:
    """"cuda" when a GPU is present; else "cpu", with the interpreter switched on (or an error if too late)."""
    if torch.cuda.is_available():
        return "cuda"
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton was imported before TRITON_INTERPRET=1 could be set; its CPU interpreter is off")
    os.environ["TRITON_INTERPRET"] = "1"
    return "cpu"
