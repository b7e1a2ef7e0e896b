"""Which arithmetic the encoders run in: bf16 autocast where the hardware makes it faster, fp32 elsewhere.

bf16 autocast pays off only where the chip multiplies bf16 natively: every CUDA GPU from Ampere on,
and CPUs with AMX or AVX-512-BF16 (measured on a 2-core AMX Xeon: one MoCo step of ResNet-18 at
64 px runs 1.76x faster). On a CPU without them PyTorch emulates bf16 and the same step ran 30
times slower, so `auto` must ask the hardware, through PyTorch's own capability checks (the ones
its oneDNN kernels use), never a model name.

Autocast covers only the encoders' forward (`autocast` below, used by `moco.model` and
`moco.evaluate`); the loss, its logits and softmax, the L2 normalisations of the embeddings, the
queue and the momentum update stay float32: they are cheap, and rounding there would change what
is learnt (a bf16 logit has 3 significant digits; the queue would lose precision every step).
The weights are float32 always, so a run may switch precision between sessions.

On such a CPU, bf16 is faster only for some shapes (1.76x at 64 px, 0.85x at 32 px for ResNet-18 on
a 2-core AMX Xeon), so `auto` there times the run's own step in both precisions first
(`moco.step_timing`) and keeps bf16 only when it is clearly faster.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

PRECISIONS = ("auto", "fp32", "bf16")

BF16_MIN_SPEEDUP = 1.15
"""How much faster bf16's timed step must be than fp32's before `auto` picks it on a CPU. The
margin covers the timing's noise on a shared machine; below it the gain would not pay for the
risk: bf16 costs no accuracy for the same steps (3 flowers seeds), but a 16-image, two-process
run at LR 0.6 once diverged to NaN in bf16 where fp32 did not."""
_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def cpu_has_fast_bf16() -> bool:
    """AMX-BF16 or AVX-512-BF16: the instructions oneDNN's bf16 convolutions and matmuls need to
    beat fp32. A seam: tests replace it to see both answers on one machine."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:  # public since PyTorch 2.9
        caps = capabilities()
        return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def cuda_has_fast_bf16(device: torch.device) -> bool:
    """Native bf16 (compute capability 8.0 and up); older GPUs only emulate it. A seam, as above."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def choose_precision(requested: str, device: torch.device, *, compiled: bool = False,
                     rates: Callable[[], dict[str, float]] | None = None,
                     timed: str = "the model step") -> tuple[torch.dtype | None, str]:
    """(autocast dtype or None for plain fp32, the reason in words) for `requested` on `device`;
    `compiled`: the step runs under torch.compile; `rates`: times the run's step, {"fp32": img/s,
    "bf16": img/s} (`moco.step_timing.precision_rates`), called only where the answer depends on it
    (auto on a CPU with native bf16); without it such a CPU stays fp32. `timed`: what `rates`
    times, in the reason's words."""
    if requested not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested != "auto":
        return _DTYPES[requested], f"{requested} as asked"
    if torch.get_default_dtype() != torch.float32:
        # A float64 run (the cross-CPU reproducibility tests) must stay float64: no autocast.
        return None, f"no autocast: the default dtype is {torch.get_default_dtype()}, not float32"
    if device.type == "cuda":
        if cuda_has_fast_bf16(device):
            return torch.bfloat16, "bf16: this GPU computes bf16 natively"
        return None, "fp32: this GPU only emulates bf16"
    if device.type != "cpu":
        return None, f"fp32: bf16 autocast is not tried on {device.type}"
    if not cpu_has_fast_bf16():
        return None, "fp32: this CPU has neither AMX nor AVX-512-BF16 (bf16 would be emulated, far slower)"
    if compiled:
        # Measured with PyTorch 2.14: the inductor-compiled MoCo step under bf16 autocast gave a NaN
        # loss at its first step where the eager one trained; fp32 compiles and matches eager.
        return None, "fp32: torch.compile with bf16 autocast on a CPU gave NaN losses (issue 18)"
    if rates is None:
        return None, ("fp32: this CPU has AMX or AVX-512-BF16, but bf16 is faster only for some shapes and was "
                      "not timed here (--precision bf16 to use it)")
    measured = rates()
    fp32, bf16 = measured["fp32"], measured["bf16"]
    timing = f"{timed} timed at {bf16:.0f} img/s in bf16 against {fp32:.0f} in fp32 on this CPU"
    if bf16 >= BF16_MIN_SPEEDUP * fp32:
        return torch.bfloat16, f"bf16: {timing} ({bf16 / fp32:.2f}x)"
    return None, (f"fp32: {timing} ({bf16 / fp32:.2f}x, under the {BF16_MIN_SPEEDUP:.2f}x bf16 needs; "
                  f"--precision bf16 to use it anyway)")


def precision_name(dtype: torch.dtype | None) -> str:
    """The config's word for an autocast dtype."""
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def resolve_precision(requested: str, device: torch.device, *, compiled: bool = False,
                      rates: Callable[[], dict[str, float]] | None = None,
                      timed: str = "the model step") -> tuple[str, str]:
    """("fp32" or "bf16", reason): what a run stores in its config, so a resumed run, or an
    evaluation of it, does not depend on the machine it continues on."""
    dtype, reason = choose_precision(requested, device, compiled=compiled, rates=rates, timed=timed)
    return precision_name(dtype), reason


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """The encoders' forward in `precision` ("fp32", "bf16" or "auto") on `device`; a no-op for
    fp32. Inside it, anything numerically sensitive must step out with `full_precision`."""
    device_type = torch.device(device).type
    dtype = _DTYPES[precision] if precision in _DTYPES else choose_precision(precision, torch.device(device))[0]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def full_precision(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Autocast switched off: the enclosed ops run in the dtype of their inputs (float32)."""
    return torch.autocast(torch.device(device).type, enabled=False)
