"""Backend selection: the kernels are self-checked against the torch reference before they serve."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pdserve.engine.kernels import check, self_check


def test_self_check_reports_a_crashing_kernel(monkeypatch):
    def boom(case, device):
        raise RuntimeError("launch failed")

    monkeypatch.setattr(check, "run_case", boom)
    assert "RuntimeError: launch failed" in self_check("cpu")


def test_self_check_reports_a_wrong_kernel(monkeypatch):
    monkeypatch.setattr(check, "run_case", lambda case, device: {"ok": False, "rel_err": 0.8, "tol": 0.01})
    assert "relative error 0.8" in self_check("cpu")


def test_self_check_passes_good_kernels(monkeypatch):
    seen = []
    monkeypatch.setattr(check, "run_case", lambda case, device: seen.append(case.name) or {"ok": True})
    assert self_check("cpu") == "" and len(seen) == 2


def test_explicit_triton_runs_after_a_real_self_check_under_the_interpreter():
    pytest.importorskip("triton")
    code = ("import torch; from engine.model_runner import resolve_attention_backend as r; "
            "print(r('triton', torch.device('cpu')), r('auto', torch.device('cpu')))")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["triton", "torch"]  # auto stays torch on CPU
