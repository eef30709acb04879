"""`KNNLogitsProcessor(cuda_graph=True)`: the kNN step captured once and replayed must give what the eager step gives
(which the other tests hold to a float64 brute force), fall back where the search syncs with the host, and never
replay a graph over an index that was rebuilt."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList

from hf_realm import KNNLogitsProcessor
from hf_realm.knn_generation import _StepGraph

from .test_knn_generation import EOS, pad_right, random_store, reference_mix, store_near_model_states, tiny_marian


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_graph_is_ignored_on_the_cpu():
    """On the CPU the option changes nothing: the eager step, against the float64 reference."""
    from .test_knn_generation import tiny_gpt2

    model = tiny_gpt2()
    store = random_store()
    proc = KNNLogitsProcessor(store, k=5, temperature=3.0, lmbda=0.4, cuda_graph=True)
    input_ids = torch.randint(2, 99, (4, 6), generator=torch.Generator().manual_seed(3))
    with proc.attach(model, check_weights=False), torch.no_grad():
        scores = model(input_ids).logits[:, -1].float()
        state = proc.hook.state.clone()
        out = proc(input_ids, scores)
        assert not proc._graphs and not proc._graph_seen
    ref, _ = reference_mix(state.numpy(), scores.numpy(), store.keys, store.values, 5, 3.0, 0.4)
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=0, atol=2e-5)


def _captures(monkeypatch) -> list:
    calls = []
    real = _StepGraph.capture.__func__
    monkeypatch.setattr(_StepGraph, "capture", classmethod(lambda cls, *a: calls.append(1) or real(cls, *a)))
    return calls


def _beam_generate(model, proc):
    src, mask = pad_right([[5, 6, 7, 8, EOS], [9, 10, EOS], [11, 12, 13, 14, 15, 16, EOS]])
    kw = dict(input_ids=src.cuda(), attention_mask=mask.cuda(), max_new_tokens=10, num_beams=3, do_sample=False,
              output_scores=True, return_dict_in_generate=True)  # fmt: skip
    with proc.attach(model, check_weights=False):
        return model.generate(logits_processor=LogitsProcessorList([proc]), **kw)


@needs_cuda
@pytest.mark.parametrize(
    "index",
    [
        {"index": "torch", "rescore": False},
        {"index": "torch-ivf", "nlist": 8, "nprobe": 2, "scan": "union", "read_in_place": True},
    ],
)
def test_replayed_step_equals_the_eager_step(index, monkeypatch):
    model = tiny_marian()
    store = store_near_model_states(model, counts=True)
    model = model.cuda()
    options = dict(index)
    store.build_index(options.pop("index"), device="cuda", **options)
    captures = _captures(monkeypatch)
    eager = _beam_generate(model, KNNLogitsProcessor(store, k=6, temperature=2.0, lmbda=0.7))
    graphed_proc = KNNLogitsProcessor(store, k=6, temperature=2.0, lmbda=0.7, cuda_graph=True)
    graphed = _beam_generate(model, graphed_proc)
    assert len(captures) == 1 and not graphed_proc._graph_failed  # captured at step 2, replayed after
    assert graphed.sequences.tolist() == eager.sequences.tolist()
    for a, b in zip(graphed.scores, eager.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # scatter_add's atomics may sum in another order


@needs_cuda
def test_a_search_that_syncs_falls_back_with_a_warning(monkeypatch):
    """The exact index's default bound check reads a flag back from the GPU: found in the warm-up before any capture;
    no graph, the eager step, a warning; sampling still works afterwards."""
    model = tiny_marian()
    store = store_near_model_states(model)
    model = model.cuda()
    store.build_index("torch", device="cuda")  # rescore=True: one host sync per search
    eager = _beam_generate(model, KNNLogitsProcessor(store, k=6, temperature=2.0, lmbda=0.7))
    proc = KNNLogitsProcessor(store, k=6, temperature=2.0, lmbda=0.7, cuda_graph=True)
    captures = _captures(monkeypatch)
    with pytest.warns(RuntimeWarning, match="cannot be captured in a CUDA graph"):
        graphed = _beam_generate(model, proc)
    assert len(proc._graph_failed) == 1 and len(captures) == 1  # tried once, refused before capturing
    torch.randn(3, device="cuda")  # a failed capture would have left CUDA's generator unusable
    assert graphed.sequences.tolist() == eager.sequences.tolist()
    for a, b in zip(graphed.scores, eager.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@needs_cuda
def test_a_rebuilt_index_is_captured_again(monkeypatch):
    """A graph holds the addresses of the index it captured: after `build_index` the step is captured anew, and its
    answer is the new index's (here: a store whose every value is one token, at λ = 1)."""
    store = random_store(n=400, dim=32)
    proc = KNNLogitsProcessor(store, k=4, temperature=10.0, lmbda=1.0, cuda_graph=True)
    captures = _captures(monkeypatch)
    queries = torch.randn(6, 32, device="cuda")
    scores = torch.randn(6, 99, device="cuda")
    store.build_index("torch", device="cuda", rescore=False)

    class Hook:
        num_calls = 0
        state = queries

    proc.hook = Hook()
    outs = []
    for step in range(3):
        Hook.num_calls += 1
        outs.append(proc(torch.zeros(6, step + 1, dtype=torch.long, device="cuda"), scores))
    assert len(captures) == 1
    torch.testing.assert_close(outs[2], outs[1], rtol=0, atol=0)
    values = store.values.copy()
    store.values[:] = 7  # new tables and a new index (build_index moves both again)
    store._tables = None
    store.build_index("torch", device="cuda", rescore=False)
    Hook.num_calls += 1
    out = proc(torch.zeros(6, 4, dtype=torch.long, device="cuda"), scores)
    assert len(captures) == 2
    assert (out.argmax(-1) == 7).all() and torch.isfinite(out[:, 7]).all()
    store.values[:] = values
