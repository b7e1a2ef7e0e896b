"""`python -m moco` with every floating-point tensor in float64: a test helper, run in its own
process (`python -m tests.moco.run_float64 train ...`, or under torchrun) because it changes
process-wide settings.

Why: in float64 the rounding noise of a different summation order is about 1e-16 relative
instead of 6e-8, so two runs of the same computation that differ only in how sums are split
(one process against two, see test_distributed.py) agree to ~1e-13 and can be compared with a
tight tolerance on any CPU.
"""

from __future__ import annotations

import sys

import torch


def _keep_float64(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The code casts to float32 on purpose in places (embeddings and the loss stay float32
    under bf16 autocast); in this run that cast must keep float64, not drop to float32."""
    return self.to(torch.float64)


def main(argv: list[str]) -> int:
    # Parameters, buffers (the negative queue), normalisation constants and pixels all take the
    # default dtype, so this one setting and the cast above make the whole step float64.
    torch.set_default_dtype(torch.float64)
    torch.Tensor.float = _keep_float64
    from moco.__main__ import main as moco_main

    return moco_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
