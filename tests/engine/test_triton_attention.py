"""Triton paged attention vs the torch reference, on CPU through Triton's interpreter, and on CUDA.

TRITON_INTERPRET must be set before triton is first imported (transformers imports it too), so the CPU checks
run once in a child process (``python -m engine.kernels.check --json --engine`` with TRITON_INTERPRET=1) and
the tests below assert on its per-case results; this process's environment is left alone. The cases live in
engine/kernels/check.py: fp32 and bf16, MHA and GQA (4/2, 8/1), block sizes 16 and 4, context lengths that
are not block-aligned, batches mixing decode rows with prefill-with-prefix rows, decode split-K, sliding
window, softcap, and a head_dim that is not a power of two. The kernels are also compiled for sm_90 (no GPU
needed), and on CUDA the same cases run natively (``-m gpu``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.kernels.check import CASES, TOLERANCE, engine_parity, run_cases
from pdserve.engine.model_runner import resolve_attention_backend

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def interpreted():
    """Results of every check case run under the interpreter in a child process (one run per module)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pdserve.engine.kernels.check", "--device", "cpu", "--json", "--engine"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode in (0, 1), f"check crashed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernel_matches_torch_reference_interpreted(interpreted, case):
    r = {r["name"]: r for r in interpreted["cases"]}[case.name]
    assert r["ref_abs_mean"] > 1e-2, "reference output is trivial; the comparison would prove nothing"
    assert r["rel_err"] <= TOLERANCE[case.dtype], r
    assert r["ok"], r


def test_engine_greedy_tokens_match_with_triton_backend_interpreted(interpreted):
    e = interpreted["engine"]
    assert e["num_cached_tokens"] > 0, "the second batch was meant to prefill on top of a cached prefix"
    assert e["tokens"]["triton"] == e["tokens"]["torch"]


def test_harness_catches_a_wrong_kernel_call(interpreted):
    assert interpreted["negative_rel_err"] > 0.05


def test_module_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "from engine.attention import BACKENDS\n"
        "from engine.kernels import load_triton_backend\n"
        "from engine.kernels import triton_attention as t\n"
        "assert not t.TRITON_AVAILABLE and 'triton' not in BACKENDS\n"
        "print(load_triton_backend('cpu'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "triton is not installed" in proc.stdout


def test_backend_selection_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_attention_backend("auto", cpu) == "torch"
    assert resolve_attention_backend("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="attention_backend"):
        resolve_attention_backend("flash-nope", cpu)
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(attention_backend="")
    assert EngineConfig().attention_backend == "auto"


def test_explicit_triton_on_cpu_needs_the_interpreter():
    pytest.importorskip("triton")
    from pdserve.engine.attention import BACKENDS
    from pdserve.engine.kernels import triton_attention

    if triton_attention.interpreter_enabled():
        pytest.skip("this process runs with TRITON_INTERPRET=1")
    with pytest.raises(ValueError, match="attention_backend: 'triton' cannot run here"):
        resolve_attention_backend("triton", torch.device("cpu"))
    assert BACKENDS["triton"] is triton_attention.triton_paged_attention


def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter skips Triton's compiler; this runs it (to a cubin, with the bundled ptxas) so that
    GPU-only errors (constexpr branches, dot shapes/dtypes, layouts) fail here too."""
    pytest.importorskip("triton")
    from pdserve.engine.kernels import triton_attention
    from pdserve.engine.kernels.check import compile_for_gpu

    if triton_attention.interpreter_enabled():
        pytest.skip("this process runs with TRITON_INTERPRET=1")
    compiled = compile_for_gpu(arch=90)
    assert {line.split()[0] for line in compiled} == {"_decode_kernel", "_prefill_kernel", "_decode_merge_kernel"}


@pytest.mark.gpu
def test_kernel_matches_torch_reference_cuda():
    pytest.importorskip("triton")
    from pdserve.engine.kernels import triton_attention

    if triton_attention.interpreter_enabled():
        pytest.skip("TRITON_INTERPRET=1 is set: the kernels are interpreted")
    results = run_cases(device="cuda")
    bad = [r for r in results if not r["ok"]]
    assert not bad, bad
    assert resolve_attention_backend("auto", torch.device("cuda")) == "triton"
    e = engine_parity("cuda")
    assert e["ok"], e
