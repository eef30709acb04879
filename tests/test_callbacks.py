"""IndexRefreshCallback inside real Trainer runs: refresh, async, failure safety, checkpoint + resume."""

import os
import threading

import datasets
import pytest
import torch
from transformers import Trainer

from hf_realm import RealmBlockIndex, RealmForMaskedLM, embed_corpus
from hf_realm.callbacks import IndexRefreshCallback

from .conftest import tiny_realm_config, tiny_training_args


NUM_BLOCKS = 12
EMBED = {"show_progress": False}


def corpus():
    rows = [[2, 10 + i, 3, 30 + i, 31 + (i % 4), 3] for i in range(NUM_BLOCKS)]
    return datasets.Dataset.from_dict({"input_ids": rows, "token_type_start": [3] * NUM_BLOCKS})


def examples(n=16):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = [2] + torch.randint(5, 60, (5,), generator=g).tolist() + [3]
        labels = [-100] * 7
        labels[2] = 30 + i % NUM_BLOCKS
        ids[2] = 4
        out.append({"input_ids": ids, "labels": labels})
    return out


def collate(batch):
    return {k: torch.tensor([b[k] for b in batch]) for k in ("input_ids", "labels")}


def make(tmp_path, **callback_kwargs):
    torch.manual_seed(0)
    config = tiny_realm_config(
        vocab_size=64, num_hidden_layers=1, num_candidates=3, max_position_embeddings=32, pad_token_id=0
    )
    model = RealmForMaskedLM(config)
    index = RealmBlockIndex.build(corpus(), model.embedder, backend="torch", embed_kwargs=EMBED)
    model.index = index
    callback = IndexRefreshCallback(index, embed_kwargs=EMBED, **callback_kwargs)
    return model, index, callback


def trainer(model, callback, tmp_path, max_steps=6, **kwargs):
    fields = dict(max_steps=max_steps, learning_rate=5e-3, logging_steps=2, disable_tqdm=True)
    args = tiny_training_args(tmp_path, **{**fields, **kwargs})
    return Trainer(model=model, args=args, train_dataset=examples(), data_collator=collate, callbacks=[callback])


def test_sync_refresh_keeps_the_index_equal_to_the_current_doc_encoder(tmp_path):
    model, index, callback = make(tmp_path, refresh_steps=2, refresh_at_train_end=True)
    initial = index.embeddings.clone()
    t = trainer(model, callback, tmp_path, max_steps=5)
    t.train()
    assert callback.num_refreshes == 3  # steps 2 and 4, then at the end (5)
    assert callback.built_at_step == 5
    fresh = embed_corpus(model.embedder, index.tokens, show_progress=False)
    torch.testing.assert_close(index.embeddings, fresh, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(index.embeddings, initial, atol=1e-4)
    logged = [h for h in t.state.log_history if "index_staleness" in h]
    assert [h["index_staleness"] for h in logged] == [0, 0]  # logged right after the refreshes at 2 and 4


def test_refresh_disabled_leaves_the_index_alone(tmp_path):
    model, index, callback = make(tmp_path, refresh_steps=0)
    initial = index.embeddings.clone()
    t = trainer(model, callback, tmp_path, max_steps=4)
    t.train()
    assert callback.num_refreshes == 0 and torch.equal(index.embeddings, initial)
    assert t.state.log_history[-2]["index_staleness"] == 4


def test_failed_refresh_keeps_the_old_index_serving_and_training_going(tmp_path, monkeypatch):
    model, index, callback = make(tmp_path, refresh_steps=2)
    initial = index.embeddings.clone()

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr("hf_realm.corpus_index.embed_corpus", broken)
    t = trainer(model, callback, tmp_path, max_steps=5)
    t.train()
    assert t.state.global_step == 5
    assert callback.failures == 2 and callback.num_refreshes == 0
    assert torch.equal(index.embeddings, initial)
    # the index still answers queries
    scores, ids = index.search(torch.randn(2, 16), k=3)
    assert ids.shape == (2, 3)


def test_interrupted_refresh_swaps_nothing_in(tmp_path, monkeypatch):
    model, index, callback = make(tmp_path, refresh_steps=2)
    initial = index.embeddings.clone()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("hf_realm.corpus_index.embed_corpus", interrupted)
    with pytest.raises(KeyboardInterrupt):
        callback.refresh(model.embedder, step=2)
    assert torch.equal(index.embeddings, initial) and callback.num_refreshes == 0


def test_async_refresh_embeds_a_snapshot_while_training_continues(tmp_path, monkeypatch):
    model, index, callback = make(tmp_path, refresh_steps=2, mode="async")
    release = threading.Event()
    seen = {}
    real = embed_corpus

    def slow(embedder, *args, **kwargs):
        # the background copy must be a snapshot: record what it computes, then wait for training to move on
        out = real(embedder, *args, **kwargs)
        seen.setdefault("first", out.clone())
        release.wait(timeout=30)
        return out

    monkeypatch.setattr("hf_realm.corpus_index.embed_corpus", slow)

    class Release(IndexRefreshCallback.__bases__[0]):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                seen["steps_done_while_pending"] = state.global_step
                release.set()

    t = trainer(model, callback, tmp_path, max_steps=6)
    t.add_callback(Release())
    t.train()
    assert seen["steps_done_while_pending"] == 4  # training went on while the refresh from step 2 was running
    # swapped in at step 5 (the first step end after it finished); no second refresh while one was in flight
    assert callback.num_refreshes == 1 and callback.built_at_step == 2
    torch.testing.assert_close(index.embeddings, seen["first"])
    # the snapshot is the doc encoder of step 2, not the final one
    final = real(model.embedder, index.tokens, show_progress=False)
    assert not torch.allclose(index.embeddings, final, atol=1e-5)


def test_index_saved_with_checkpoints_and_restored_on_resume(tmp_path):
    model, index, callback = make(tmp_path, refresh_steps=2)
    t = trainer(model, callback, tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    t.train()
    saved = os.path.join(tmp_path, "checkpoint-2", "index")
    assert os.path.isdir(saved)
    at_step_2 = RealmBlockIndex.from_pretrained(saved).embeddings

    # a new run resumes from checkpoint 2: its fresh index must be replaced by the checkpoint's
    model2, index2, callback2 = make(tmp_path, refresh_steps=2)
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)  # anything but the checkpoint's weights
    index2.update_embeddings(torch.randn_like(index2.embeddings))
    t2 = trainer(model2, callback2, tmp_path, max_steps=3, save_strategy="no")
    t2.train(resume_from_checkpoint=os.path.join(tmp_path, "checkpoint-2"))
    assert callback2.built_at_step == 2  # restored from the checkpoint, nothing refreshed since
    torch.testing.assert_close(index2.embeddings, at_step_2)


def test_bad_arguments():
    model, index, _ = make(None)
    with pytest.raises(ValueError, match="mode must be 'sync' or 'async'"):
        IndexRefreshCallback(index, mode="sometimes")
    with pytest.raises(ValueError, match="refresh_steps must be >= 0"):
        IndexRefreshCallback(index, refresh_steps=-1)


def test_from_pretrained_attaches_a_real_index_without_copying_it(tmp_path):
    model, index, _ = make(tmp_path)
    model.save_pretrained(tmp_path / "model", save_index=False)
    reloaded = RealmForMaskedLM.from_pretrained(tmp_path / "model", index=index)
    assert reloaded.index is index  # attached, not deep-copied (transformers copies config kwargs)
    batch = collate(examples(4))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).loss, reloaded.eval()(**batch).loss)
