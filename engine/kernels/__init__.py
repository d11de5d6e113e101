"""Optional compiled attention kernels.

Importing this package is cheap and never imports triton; ``load_triton_backend`` does, and registers the
``triton`` attention backend (see ``engine.kernels.triton_attention``) when triton is installed.
"""

from __future__ import annotations

import torch


def load_triton_backend(device: torch.device | str) -> tuple[bool, str]:
    """Import the Triton kernels (registering backend ``triton``) and say whether they can run on ``device``.

    Returns (usable, reason): the reason is empty when usable, else a short sentence for an error message.
    """
    from pdserve.engine.kernels import triton_attention

    if not triton_attention.TRITON_AVAILABLE:
        return False, "triton is not installed"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        if torch.cuda.get_device_capability(device) < (8, 0):
            return False, "the kernels need a GPU of compute capability 8.0 or newer (bf16 tensor cores)"
        return True, ""
    if device.type == "cpu" and triton_attention.interpreter_enabled():
        return True, ""
    return False, f"triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU checks), got {device.type!r}"


SELF_CHECK_CASES = ("gqa4x2_bf16_bs16_mixed", "gqa4x2_bf16_bs16_decode_split2")


def self_check(device: torch.device | str) -> str:
    """Run a couple of the kernel checks on ``device`` against the torch reference before serving with the
    kernels: a miscompile or a driver problem must cost speed, never correct tokens. Returns "" when they
    pass, else the reason."""
    from pdserve.engine.kernels import check

    for case in check.CASES:
        if case.name not in SELF_CHECK_CASES:
            continue
        try:
            r = check.run_case(case, device)
        except Exception as e:  # noqa: BLE001 - any failure means "do not use the kernels"
            return f"{case.name}: {type(e).__name__}: {e}"
        if not r["ok"]:
            return f"{case.name}: relative error {r['rel_err']:.3g} over {r['tol']:g}"
    return ""


__all__ = ["load_triton_backend", "self_check"]
