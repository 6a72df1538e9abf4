"""Run the Triton kernels under the CPU interpreter when there is no GPU.

Triton reads TRITON_INTERPRET when ``@triton.jit`` decorates a kernel, i.e. when
``ecoserve.kernels.triton_kernels`` is first imported, so it is set here, at collection time,
before any test module in this folder imports that module.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
