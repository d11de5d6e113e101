"""Correctness harness for the Triton attention kernels against ``torch_paged_attention``.

Used by tests/engine/test_triton_attention.py and bench/gpu_check.py. Each ``Case`` builds a random paged
cache with shuffled (non-contiguous) block tables. Every cache slot that no sequence may see (block 0, which
padded decode tables point at, the tails of last blocks, spare blocks) holds a large garbage value, so a
masking bug shows up as a large error instead of hiding in the noise.

On CPU the kernels run under Triton's interpreter, which must be on before triton is first imported:

    TRITON_INTERPRET=1 python -m engine.kernels.check [--json] [--engine]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import torch

from pdserve.engine.attention import AttentionMetadata, SeqAttnInfo, torch_paged_attention

GARBAGE = 64.0  # in every slot attention must not read; exactly representable in bf16
TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 5e-3}


@dataclass(frozen=True, slots=True)
class Case:
    """One attention call. seqs: (context_len, query_len) in batch order; query_len 1 is a decode row."""

    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    seqs: tuple[tuple[int, int], ...]
    dtype: str = "float32"
    sliding_window: int | None = None
    softcap: float | None = None
    num_splits: int | None = None  # decode split-K; None: the kernel's own choice


_MIXED = ((37, 37), (40, 1), (50, 13), (1, 1), (17, 1), (9, 4))  # prefill, decode, prefix-prefill, ...
_DECODE = ((5, 1), (70, 1), (33, 1), (16, 1))

CASES: tuple[Case, ...] = (
    Case("mha_fp32_bs16_mixed", 4, 4, 32, 16, _MIXED),
    Case("gqa4x2_fp32_bs4_mixed", 4, 2, 32, 4, _MIXED),
    Case("gqa8x1_fp32_bs16_mixed", 8, 1, 32, 16, _MIXED),
    Case("gqa4x2_bf16_bs16_mixed", 4, 2, 64, 16, _MIXED, dtype="bfloat16"),
    Case("gqa8x1_bf16_bs4_mixed", 8, 1, 32, 4, _MIXED, dtype="bfloat16"),
    Case("mha_bf16_bs4_decode", 2, 2, 32, 4, _DECODE, dtype="bfloat16"),
    Case("gqa4x2_fp32_bs4_decode_split3", 4, 2, 32, 4, _DECODE, num_splits=3),
    Case("gqa4x2_bf16_bs16_decode_split2", 4, 2, 32, 16, _DECODE, dtype="bfloat16", num_splits=2),
    Case("gqa4x2_fp32_bs4_window", 4, 2, 32, 4, _MIXED, sliding_window=7),
    Case("gqa4x2_fp32_bs4_window_split2", 4, 2, 32, 4, _DECODE, sliding_window=20, num_splits=2),
    Case("gqa4x2_fp32_bs16_softcap", 4, 2, 32, 16, _MIXED, softcap=2.0),
    Case("gqa2x1_fp32_bs4_dim24_long_prefill", 2, 1, 24, 4, ((90, 90), (70, 30), (3, 1))),
)


def build(case: Case, device: str | torch.device = "cpu", seed: int = 0):
    """Random (cache, meta, q, scaling) for ``case``."""
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator().manual_seed(seed)
    bs = case.block_size
    blocks_per_seq = [-(-ctx // bs) for ctx, _ in case.seqs]
    num_blocks = 1 + sum(blocks_per_seq) + 3  # block 0 and a few spares are never referenced
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    cache = torch.full((num_blocks, 2, bs, case.num_kv_heads, case.head_dim), GARBAGE, dtype=torch.float32)
    seqs: list[SeqAttnInfo] = []
    tables: list[list[int]] = []
    query_start = 0
    for (ctx, qlen), nblk in zip(case.seqs, blocks_per_seq, strict=True):
        if not 1 <= qlen <= ctx:
            raise ValueError(f"case {case.name}: query_len {qlen} must be in 1..context_len {ctx}")
        table, ids = ids[:nblk], ids[nblk:]
        tables.append(table)
        pos = torch.arange(ctx)
        blk = torch.tensor(table)[pos // bs]
        cache[blk, :, pos % bs] = torch.randn(ctx, 2, case.num_kv_heads, case.head_dim, generator=gen)
        seqs.append(SeqAttnInfo(query_start, qlen, ctx, torch.tensor(table, device=device)))
        query_start += qlen
    decode_idx = [i for i, (_, qlen) in enumerate(case.seqs) if qlen == 1]
    prefill_idx = [i for i, (_, qlen) in enumerate(case.seqs) if qlen != 1]
    dec_tables = dec_lens = None
    if decode_idx:
        width = max(len(tables[i]) for i in decode_idx)
        dec_tables = torch.tensor([tables[i] + [0] * (width - len(tables[i])) for i in decode_idx], device=device)
        dec_lens = torch.tensor([case.seqs[i][0] for i in decode_idx], device=device)
    cache = cache.to(device=device, dtype=dtype)
    empty = torch.empty(0, dtype=torch.long, device=device)
    meta = AttentionMetadata(
        kv_caches=[cache], block_size=bs, slot_blocks=empty, slot_offsets=empty, seqs=seqs,
        decode_indices=decode_idx, prefill_indices=prefill_idx,
        decode_block_tables=dec_tables, decode_context_lens=dec_lens,
    )
    # q as the attention hook sees it: a [T, H, D] view of a [H, T, D] tensor (non-contiguous)
    q = torch.randn(case.num_heads, query_start, case.head_dim, generator=gen).to(device, dtype).transpose(0, 1)
    return cache, meta, q, case.head_dim**-0.5


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def run_case(case: Case, device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """Kernel vs reference on one case: rel_err (vs the reference in the case's dtype), rel_err_fp32 (vs an
    fp32 reference on the same inputs), ref_abs_mean (must be well above 0: never compare zeros), ok."""
    from pdserve.engine.kernels.triton_attention import paged_attention

    cache, meta, q, scaling = build(case, device, seed)
    args = (scaling, case.sliding_window, case.softcap)
    ref = torch_paged_attention(cache, meta, q, *args)
    ref32 = torch_paged_attention(cache.float(), meta, q.float(), *args)
    out = paged_attention(cache, meta, q, *args, num_splits=case.num_splits)
    rel, rel32 = _rel_err(out, ref), _rel_err(out, ref32)
    ref_abs_mean = ref.float().abs().mean().item()
    tol = TOLERANCE[case.dtype]
    ok = (
        out.dtype == q.dtype
        and out.shape == q.shape
        and bool(torch.isfinite(out).all())
        and ref_abs_mean > 1e-2
        and rel <= tol
    )
    return dict(name=case.name, dtype=case.dtype, rel_err=rel, rel_err_fp32=rel32, tol=tol,
                ref_abs_mean=ref_abs_mean, ok=ok)


def run_cases(cases=CASES, device: str | torch.device = "cpu", seed: int = 0) -> list[dict]:
    return [run_case(c, device, seed) for c in cases]


def engine_parity(device: str = "cpu", model: str = "tiny", max_tokens: int = 8) -> dict:
    """Greedy tokens of the engine with backend triton vs torch (fp32): batched prompts with a shared prefix,
    so steps mix prefill-with-prefix and decode rows. Small on purpose: it runs under the interpreter on CPU."""
    from pdserve.engine.llm import LLM
    from pdserve.engine.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(5)
    head = torch.randint(3, 300, (40,), generator=gen).tolist()
    prompts = [head, head[:32] + [7, 8, 9], torch.randint(3, 300, (21,), generator=gen).tolist(), [11]]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    out: dict[str, list[list[int]]] = {}
    cached = 0
    for backend in ("torch", "triton"):
        llm = LLM(model, device=device, dtype="float32", num_blocks=64, block_size=4, attention_backend=backend)
        if llm.engine.runner.attention_backend != backend:
            raise RuntimeError(f"engine runs {llm.engine.runner.attention_backend!r}, not {backend!r}")
        first = llm.generate(prompts[:1], params)
        rest = llm.generate(prompts[1:], params)  # prompt 1 hits the cached prefix of prompt 0
        out[backend] = [o.token_ids for o in first + rest]
        cached = rest[0].num_cached_tokens
    return dict(name=f"engine_{model}_triton_vs_torch", tokens=out, num_cached_tokens=cached,
                ok=out["torch"] == out["triton"] and cached > 0)


def negative_control(device: str | torch.device = "cpu") -> float:
    """Relative error of a deliberately wrong call (window dropped): proves the harness can fail."""
    from pdserve.engine.kernels.triton_attention import paged_attention

    case = Case("negative", 4, 2, 32, 4, _MIXED, sliding_window=5)
    cache, meta, q, scaling = build(case, device)
    ref = torch_paged_attention(cache, meta, q, scaling, case.sliding_window, None)
    return _rel_err(paged_attention(cache, meta, q, scaling, None, None), ref)


def compile_for_gpu(arch: int = 90, full: bool = False) -> list[str]:
    """Compile the kernels to a CUDA cubin for sm_``arch`` without a GPU (Triton's bundled ptxas): catches
    what the interpreter cannot (constexpr branches, dot shapes and dtypes, layouts). Needs the kernels built
    without the interpreter. Returns one line per variant compiled; raises on a compile error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pdserve.engine.kernels import triton_attention as ta
    from pdserve.engine.kernels import triton_kernels as tk

    if ta.interpreter_enabled():
        raise RuntimeError("compile_for_gpu needs the kernels built without TRITON_INTERPRET")
    target = GPUTarget("cuda", arch, 32)
    done = []

    def compile_one(fn, sig: dict, consts: dict) -> None:
        full_sig = {n: ("constexpr" if n in consts else sig[n]) for n in fn.arg_names}
        kernel = triton.compile(ASTSource(fn, full_sig, consts), target=target)
        done.append(f"{fn.__name__} {sorted(consts.items())} shared={kernel.metadata.shared}")

    i32 = "i32"
    strides = {n: i32 for n in ("stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_tab", "stride_blk",
                                "stride_kv", "stride_tok", "stride_head")}
    scalars = dict(group=i32, head_dim=i32, qk_scale="fp32", softcap="fp32", window=i32)
    for dt in ("bf16", "fp32") if full else ("bf16",):
        for window_softcap in (False, True):
            base = dict(BLOCK_SIZE=16, BLOCK_N=64, HEAD_PAD=64, USE_SOFTCAP=window_softcap, USE_WINDOW=window_softcap,
                        DOT_PRECISION="ieee" if dt == "fp32" else "tf32", INTERPRET=False)
            ptrs = dict(q_ptr=f"*{dt}", out_ptr=f"*{dt}", cache_ptr=f"*{dt}", tables_ptr="*i64")
            decode = dict(ptrs, ctx_lens_ptr="*i64", part_acc_ptr="*fp32", part_ml_ptr="*fp32", **strides, **scalars,
                          num_heads=i32, span_bound=i32, num_splits=i32)
            for split_k in (False, True) if full else (not window_softcap,):
                compile_one(tk._decode_kernel, decode, dict(base, BLOCK_M=16, SPLIT_K=split_k))
            prefill = dict(ptrs, seq_info_ptr="*i32", **strides, **scalars)
            compile_one(tk._prefill_kernel, prefill, dict(base, BLOCK_Q=16, GROUP_PAD=4, BLOCK_M=64))
        merge = dict(out_ptr=f"*{dt}", part_acc_ptr="*fp32", part_ml_ptr="*fp32", stride_ot=i32, stride_oh=i32,
                     num_heads=i32, head_dim=i32, num_splits=i32)
        compile_one(tk._decode_merge_kernel, merge, dict(SPLITS_PAD=4, HEAD_PAD=64, INTERPRET=False))
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--engine", action="store_true", help="also compare engine greedy tokens, triton vs torch")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from pdserve.engine.kernels.triton_attention import TRITON_AVAILABLE, interpreter_enabled

    if not TRITON_AVAILABLE:
        print("triton is not installed", file=sys.stderr)
        return 2
    if args.device == "cpu" and not interpreter_enabled():
        print("CPU needs TRITON_INTERPRET=1 set before triton is imported", file=sys.stderr)
        return 2
    results = run_cases(device=args.device, seed=args.seed)
    engine = engine_parity(args.device) if args.engine else None
    negative = negative_control(args.device)
    if args.json:
        print(json.dumps(dict(cases=results, engine=engine, negative_rel_err=negative)))
    else:
        for r in results:
            print(f"{r['name']:40s} {r['dtype']:9s} rel_err {r['rel_err']:.2e} (tol {r['tol']:.0e}) "
                  f"vs fp32 {r['rel_err_fp32']:.2e} {'ok' if r['ok'] else 'FAIL'}")
        if engine:
            print(f"{engine['name']}: {'ok' if engine['ok'] else 'FAIL'} {engine['tokens']}")
        print(f"negative control (window dropped) rel_err {negative:.2e}: {'ok' if negative > 0.05 else 'FAIL'}")
    ok = all(r["ok"] for r in results) and (engine is None or engine["ok"]) and negative > 0.05
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
