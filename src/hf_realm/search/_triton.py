"""Triton kernels of [`hf_realm.search.exact_topk`] (imported only when Triton is used).

The kernels are plain functions here and are compiled (`triton.jit`) or wrapped for Triton's CPU interpreter on first
use, so one module serves both the GPU and the CPU tests.
"""

import functools

import triton
import triton.language as tl


def _bucket_max_kernel(
    Q,
    E,
    BIAS,
    OUT,
    STARTS,
    LENGTHS,
    B,
    NB_FULL,
    stride_q,
    stride_e,
    stride_out,
    D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_PAD: tl.constexpr,
    TILES: tl.constexpr,
    INDIRECT: tl.constexpr,
):
    """Pass 1 over the ``NB_FULL`` full buckets (``BLOCK_N`` keys each; the caller handles a partial last bucket).

    Program ``pid`` takes query block ``pid % num_q_blocks`` and ``TILES`` consecutive buckets; it writes ``OUT[q, bucket]
    = max over the bucket's keys of q . e + bias``. Consecutive programs share their key tiles (the query block varies
    fastest), so large query batches read each tile from HBM about once. Every tile is full, so the hot loop has no key
    masks: tiles past the end (last program only) re-read the last bucket and their columns are not stored.

    ``INDIRECT``: bucket ``b`` is instead the ``LENGTHS[b] <= BLOCK_N`` keys from row ``STARTS[b]`` on (the buckets of
    some row ranges of ``E``, read in place, e.g. the lists an IVF search probes); rows past a bucket's length are
    masked out."""
    pid = tl.program_id(0)
    num_qb = tl.cdiv(B, BLOCK_Q)
    qb = pid % num_qb
    grp = pid // num_qb
    offs_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = offs_q < B
    offs_d = tl.arange(0, BLOCK_D)
    offs_bn = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, TILES)
    maxes = tl.full((BLOCK_Q, TILES), float("-inf"), tl.float32)
    if D_PAD == BLOCK_D:
        q_res = tl.load(
            Q + offs_q[:, None] * stride_q + offs_d[None, :], mask=q_mask[:, None] & (offs_d[None, :] < D), other=0.0
        )
    for t in tl.range(0, TILES):
        tile = tl.minimum(grp * TILES + t, NB_FULL - 1)
        if INDIRECT:
            offs_n = tl.load(STARTS + tile) + offs_bn
            n_mask = offs_bn < tl.load(LENGTHS + tile)
        else:
            offs_n = tile.to(tl.int64) * BLOCK_N + offs_bn
        acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
        for d0 in tl.static_range(0, D_PAD, BLOCK_D):
            if D_PAD == BLOCK_D:
                q = q_res
            else:
                q = tl.load(
                    Q + offs_q[:, None] * stride_q + (d0 + offs_d)[None, :],
                    mask=q_mask[:, None] & ((d0 + offs_d)[None, :] < D),
                    other=0.0,
                )
            e_ptrs = E + offs_n[:, None] * stride_e + (d0 + offs_d)[None, :]
            if INDIRECT:
                e = tl.load(e_ptrs, mask=n_mask[:, None] & ((d0 + offs_d)[None, :] < D), other=0.0)
            elif D_PAD == D:
                e = tl.load(e_ptrs)
            else:
                e = tl.load(e_ptrs, mask=(d0 + offs_d)[None, :] < D, other=0.0)
            if IEEE:
                acc = tl.dot(q, tl.trans(e), acc, input_precision="ieee")
            else:
                acc = tl.dot(q, tl.trans(e), acc)
        if HAS_BIAS:
            if INDIRECT:
                acc = acc + tl.load(BIAS + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            else:
                acc = acc + tl.load(BIAS + offs_n).to(tl.float32)[None, :]
        if INDIRECT:
            acc = tl.where(n_mask[None, :], acc, float("-inf"))
        tile_max = tl.max(acc, axis=1)
        maxes = tl.where(cols[None, :] == t, tile_max[:, None], maxes)
    offs_b = grp * TILES + cols
    tl.store(
        OUT + offs_q[:, None].to(tl.int64) * stride_out + offs_b[None, :],
        maxes,
        mask=q_mask[:, None] & (offs_b[None, :] < NB_FULL),
    )


def _rescore_kernel(
    Q,
    E,
    BIAS,
    BUCKETS,
    OUT,
    STARTS,
    LENGTHS,
    N,
    KB,
    stride_q,
    stride_e,
    stride_bk,
    stride_out,
    D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_PAD: tl.constexpr,
    INDIRECT: tl.constexpr,
):
    """Pass 2. Program ``(i, j)`` scores the ``BLOCK_N`` keys of bucket ``BUCKETS[i, j]`` against query ``i`` (fp32 sums of
    exact products), writing ``-inf`` past the last key (``INDIRECT``: buckets as in pass 1, ``-inf`` past a bucket's
    length)."""
    qi = tl.program_id(0)
    j = tl.program_id(1)
    bucket = tl.load(BUCKETS + qi * stride_bk + j)
    if INDIRECT:
        offs_n = tl.load(STARTS + bucket) + tl.arange(0, BLOCK_N)
        n_mask = tl.arange(0, BLOCK_N) < tl.load(LENGTHS + bucket)
    else:
        offs_n = bucket * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in tl.static_range(0, D_PAD, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        q = tl.load(Q + qi * stride_q + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        e = tl.load(
            E + offs_n[:, None].to(tl.int64) * stride_e + offs_d[None, :],
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(e * q[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    acc = tl.where(n_mask, acc, float("-inf"))
    tl.store(OUT + qi.to(tl.int64) * stride_out + j * BLOCK_N + tl.arange(0, BLOCK_N), acc)


@functools.cache
def kernel(name: str, interpret: bool):
    """The compiled kernel ``name`` (`"bucket_max"` or `"rescore"`); ``interpret`` for CPU tensors, which needs
    ``TRITON_INTERPRET=1`` in the environment before Triton is first imported (Triton's own functions such as
    ``tl.max`` are bound to the interpreter at import time)."""
    if interpret and not triton.knobs.runtime.interpret:
        raise RuntimeError(
            "the Triton kernel got CPU tensors: run it on CUDA tensors, or set TRITON_INTERPRET=1 before Triton is "
            "imported to run it in Triton's CPU interpreter (slow, for tests)"
        )
    fn = {"bucket_max": _bucket_max_kernel, "rescore": _rescore_kernel}[name]
    return triton.jit(fn)
