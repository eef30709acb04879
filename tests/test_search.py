"""Tests of `hf_realm.search.exact_topk`: the chunked torch path and the fused Triton kernel (in Triton's CPU
interpreter), both against a float64 numpy brute force."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from hf_realm.search import TRITON_MAX_K, exact_topk, triton_available

from .conftest import subprocess_env


def brute_force(queries, keys, k, key_bias=None):
    """float64 numpy reference: the scores of the keys as stored (queries cast to the keys' dtype first)."""
    q = queries.to(keys.dtype).double().numpy()
    scores = q @ keys.double().numpy().T
    if key_bias is not None:
        scores = scores + key_bias.double().numpy()
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [7, 64, 1 << 20])
def test_torch_path_matches_brute_force(dtype, chunk_size):
    g = torch.Generator().manual_seed(0)
    queries = torch.randn(5, 12, generator=g, dtype=dtype)
    keys = torch.randn(200, 12, generator=g, dtype=dtype)
    bias = torch.randn(200, generator=g, dtype=dtype)
    for key_bias in (None, bias):
        scores, ids = exact_topk(queries, keys, 9, key_bias=key_bias, chunk_size=chunk_size, backend="torch")
        ref_scores, ref_ids = brute_force(queries, keys, 9, key_bias)
        assert scores.dtype == torch.float32 and ids.dtype == torch.int64
        np.testing.assert_array_equal(ids.numpy(), ref_ids)
        np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-5, atol=1e-5)


def test_l2_through_key_bias():
    """With key_bias = -||k||^2 / 2 the top scores are the L2 nearest keys and ||q-k||^2 = ||q||^2 - 2 score."""
    g = torch.Generator().manual_seed(1)
    queries, keys = torch.randn(4, 6, generator=g), torch.randn(50, 6, generator=g)
    scores, ids = exact_topk(queries, keys, 5, key_bias=-keys.pow(2).sum(1) / 2)
    dist = ((queries[:, None, :].double() - keys[None].double()) ** 2).sum(-1).numpy()
    ref_ids = np.argsort(dist, axis=1)[:, :5]
    np.testing.assert_array_equal(ids.numpy(), ref_ids)
    np.testing.assert_allclose(
        queries.double().pow(2).sum(1, keepdim=True).numpy() - 2 * scores.double().numpy(),
        np.take_along_axis(dist, ref_ids, axis=1),
        rtol=1e-5,
        atol=1e-5,
    )


def test_bad_input_errors():
    q, keys = torch.randn(2, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"k must be in \[1, 10\].*got 11"):
        exact_topk(q, keys, 11)
    with pytest.raises(ValueError, match="k must be in"):
        exact_topk(q, keys, 0)
    with pytest.raises(ValueError, match="query dim 3 != key dim 4"):
        exact_topk(torch.randn(2, 3), keys, 1)
    with pytest.raises(ValueError, match=r"key_bias must have shape \(10,\), got \(9,\)"):
        exact_topk(q, keys, 1, key_bias=torch.zeros(9))
    with pytest.raises(ValueError, match="backend must be"):
        exact_topk(q, keys, 1, backend="faiss")
    if triton_available():
        with pytest.raises(ValueError, match=f"k <= {TRITON_MAX_K}"):
            exact_topk(q, torch.randn(500, 4), TRITON_MAX_K + 1, backend="triton")


def test_row_ranges_torch_path_and_its_errors():
    """`row_ranges` on the torch path: the rows of the ranges gathered and searched, ids still rows of the keys."""
    g = torch.Generator().manual_seed(3)
    q, keys = torch.randn(4, 8, generator=g), torch.randn(100, 8, generator=g)
    bias = -keys.pow(2).sum(1) / 2
    ranges = (torch.tensor([70, 5, 40]), torch.tensor([30, 0, 7]))
    rows = torch.tensor([*range(70, 100), *range(40, 47)])
    scores, ids = exact_topk(q, keys, 5, key_bias=bias, row_ranges=ranges, chunk_size=8)
    want_scores, local = brute_force(q, keys[rows], 5, bias[rows])
    np.testing.assert_array_equal(ids.numpy(), rows.numpy()[local])
    np.testing.assert_allclose(scores.numpy(), want_scores, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"k must be in \[1, 37\] \(the number of rows in row_ranges\), got 38"):
        exact_topk(q, keys, 38, row_ranges=ranges)
    with pytest.raises(ValueError, match="reach outside the 100 rows"):
        exact_topk(q, keys, 1, row_ranges=(torch.tensor([95]), torch.tensor([6])))
    with pytest.raises(TypeError, match="must be int64"):
        exact_topk(q, keys, 1, row_ranges=(torch.tensor([0], dtype=torch.int32), torch.tensor([6])))


def test_auto_uses_torch_on_cpu():
    """`auto` never sends CPU tensors to Triton (the interpreter is opt-in)."""
    g = torch.Generator().manual_seed(2)
    q, keys = torch.randn(3, 8, generator=g), torch.randn(40, 8, generator=g)
    scores, ids = exact_topk(q, keys, 4)
    np.testing.assert_array_equal(ids.numpy(), brute_force(q, keys, 4)[1])


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreter already on in this process")
def test_triton_on_cpu_without_interpreter_says_how():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        exact_topk(torch.randn(2, 16), torch.randn(64, 16), 2, backend="triton")


# The Triton interpreter must be switched on before triton is imported, so the kernel cases run in a subprocess.
_TRITON_CASES = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    from hf_realm.search import exact as search
    from hf_realm.search.exact import _triton_topk

    cases = json.loads(sys.argv[1])
    out = []
    default_max_bytes = search._MAX_BUCKET_MAX_BYTES
    for case in cases:
        search._MAX_BUCKET_MAX_BYTES = case.get("max_bytes", default_max_bytes)
        g = torch.Generator().manual_seed(case["seed"])
        dtype = getattr(torch, case["dtype"])
        q = torch.randn(case["B"], case["D"], generator=g)
        keys = (torch.randn(case["N"], case["D"], generator=g) * case.get("scale", 1.0)).to(dtype)
        bias = -keys.float().pow(2).sum(1) / 2 if case["bias"] else None
        if "ranges" in case:
            starts, lengths = (torch.tensor(x, dtype=torch.int64) for x in zip(*case["ranges"]))
            if "config" in case:
                scores, ids = _triton_topk(q, keys, case["k"], bias, config=case["config"], ranges=(starts, lengths))
            else:
                scores, ids = search.exact_topk(q, keys, case["k"], key_bias=bias, backend="triton",
                                                row_ranges=(starts, lengths))
        else:
            scores, ids = _triton_topk(q, keys, case["k"], bias, config=case.get("config"))
        out.append({"scores": scores.tolist(), "ids": ids.tolist()})
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_kernel_matches_brute_force_in_interpreter():
    small = {"BLOCK_Q": 16, "BLOCK_N": 16, "BLOCK_D": 16, "TILES": 4, "num_warps": 4, "num_stages": 2}
    cases = [
        # default config: one program group, whole query block resident
        {"seed": 0, "B": 3, "N": 1000, "D": 32, "k": 5, "dtype": "float32", "bias": False},
        # fp16 keys, L2 bias, batch not a multiple of BLOCK_Q
        {"seed": 1, "B": 20, "N": 3001, "D": 48, "k": 8, "dtype": "float16", "bias": True},
        # bf16, batch of one
        {"seed": 2, "B": 1, "N": 700, "D": 16, "k": 3, "dtype": "bfloat16", "bias": False},
        # dimension looped in chunks (D_PAD > BLOCK_D), many program groups, last group partly past the keys,
        # two query blocks
        {"seed": 3, "B": 33, "N": 1237, "D": 40, "k": 7, "dtype": "float16", "bias": True, "config": small},
        # keys an exact multiple of BLOCK_N (no partial bucket), last program group past the end
        {"seed": 7, "B": 3, "N": 112, "D": 32, "k": 5, "dtype": "float16", "bias": False, "config": small},
        # more requested than buckets exist (k > number of buckets): every key is a candidate
        {"seed": 4, "B": 2, "N": 40, "D": 16, "k": 6, "dtype": "float32", "bias": False, "config": small},
        # k = number of keys
        {"seed": 5, "B": 2, "N": 24, "D": 16, "k": 24, "dtype": "float32", "bias": True, "config": small},
        # dimension below the tl.dot minimum (padded to 16); 2 buckets of 256 keys, queries searched in slices of 3
        {"seed": 6, "B": 7, "N": 300, "D": 8, "k": 4, "dtype": "float16", "bias": False, "max_bytes": 3 * 4 * 2},
        # row ranges read in place (an IVF union scan): ranges shorter and longer than a bucket, an empty one, one at
        # the very end; the default config's 256-key buckets
        {
            "seed": 8,
            "B": 5,
            "N": 2000,
            "D": 24,
            "k": 6,
            "dtype": "float16",
            "bias": True,
            "ranges": [[1700, 300], [3, 40], [600, 0], [900, 513], [100, 1]],
        },
        # more buckets chosen than the ranges have (k > buckets): every row in the ranges is a candidate
        {
            "seed": 9,
            "B": 3,
            "N": 500,
            "D": 16,
            "k": 9,
            "dtype": "bfloat16",
            "bias": False,
            "ranges": [[10, 5], [480, 20]],
        },
        # many short buckets (16 keys; ranges of 1-40 rows) and L2 scores, all below 0: a bucket's rows past its length
        # must not count (a zero there would outrank every real key); several program groups, two query blocks
        {
            "seed": 10,
            "B": 20,
            "N": 3000,
            "D": 40,
            "k": 3,
            "dtype": "float16",
            "bias": True,
            "config": small,
            "ranges": [[s, 1 + (s * 7) % 40] for s in range(0, 2900, 97)],
        },
    ]
    env = subprocess_env(TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", _TRITON_CASES, json.dumps(cases)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for case, res in zip(cases, results, strict=True):
        g = torch.Generator().manual_seed(case["seed"])
        dtype = getattr(torch, case["dtype"])
        q = torch.randn(case["B"], case["D"], generator=g)
        keys = torch.randn(case["N"], case["D"], generator=g).to(dtype)
        bias = -keys.float().pow(2).sum(1) / 2 if case["bias"] else None
        if "ranges" in case:  # the brute force over the rows of the ranges, mapped back to rows of keys
            rows = torch.tensor([r for start, n in case["ranges"] for r in range(start, start + n)])
            ref_scores, local = brute_force(q, keys[rows], case["k"], None if bias is None else bias[rows])
            ref_ids = rows.numpy()[local]
        else:
            ref_scores, ref_ids = brute_force(q, keys, case["k"], bias)
        np.testing.assert_array_equal(np.array(res["ids"]), ref_ids, err_msg=str(case))
        np.testing.assert_allclose(np.array(res["scores"]), ref_scores, rtol=1e-5, atol=1e-4, err_msg=str(case))


cuda = pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(), reason="needs CUDA and triton")


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_cuda_matches_brute_force(dtype):
    """On the GPU: the compiled kernel (tuned configs) against a float64 brute force, many shapes."""
    g = torch.Generator().manual_seed(0)
    for b, n, d, k, bias in [
        (1, 1000, 8, 1, False),
        (5, 100_003, 64, 8, True),
        (100, 20_000, 128, 64, False),
        (300, 50_000, 128, 8, False),
        (64, 30_000, 200, 128, True),
        (128, 40_000, 512, 32, True),
    ]:
        q = torch.randn(b, d, generator=g)
        keys = torch.randn(n, d, generator=g).to(dtype)
        key_bias = -keys.float().pow(2).sum(1) / 2 if bias else None
        scores, ids = exact_topk(q.cuda(), keys.cuda(), k, key_bias=None if key_bias is None else key_bias.cuda())
        ref_scores, ref_ids = brute_force(q, keys, k, key_bias)
        recall = np.mean([len(np.intersect1d(a, r)) / k for a, r in zip(ids.cpu().numpy(), ref_ids, strict=True)])
        assert recall >= 0.999, (b, n, d, k, dtype, recall)  # fp32 accumulation-order ties only
        np.testing.assert_allclose(scores.cpu().numpy(), ref_scores, rtol=1e-4, atol=1e-3)


@cuda
def test_triton_cuda_every_candidate_config():
    """Every launch config the tuner may pick gives the exact result (the tuner only times them)."""
    from hf_realm.search.exact import _candidate_configs, _default_config, _triton_topk

    g = torch.Generator().manual_seed(1)
    for b, d, k in [(1, 128, 8), (64, 128, 8), (1024, 128, 8), (128, 512, 64)]:
        q = torch.randn(b, d, generator=g)
        keys = torch.randn(30_011, d, generator=g).half()
        ref_scores, ref_ids = brute_force(q, keys, k)
        configs = _candidate_configs(b, d, k, 2) + [_default_config(b, d, k, 2)]
        ran = 0
        for cfg in configs:
            try:
                scores, ids = _triton_topk(q.cuda(), keys.cuda(), k, None, config=cfg)
            except Exception as err:  # the tuner skips what the compiler rejects (shared memory); so do we
                assert "out of resource" in str(err).lower(), (cfg, err)
                continue
            ran += 1
            recall = np.mean([len(np.intersect1d(a, r)) / k for a, r in zip(ids.cpu().numpy(), ref_ids, strict=True)])
            assert recall >= 0.999, (b, d, k, cfg, recall)
            np.testing.assert_allclose(scores.cpu().numpy(), ref_scores, rtol=1e-4, atol=1e-3)
        assert ran >= 1, (b, d, k, len(configs))
