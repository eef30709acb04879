"""Kill a save at every one of its steps in turn and load what is left.

A forked child runs the save and calls `os._exit` at the i-th `hf_realm.hub_io._checkpoint` (the hook the save calls
between its steps); the parent then loads the path: it must be the complete old directory for every step before the
swap and the complete new one from the swap on, and the next save must clear every leftover. Run with the atomic
exchange (``renameat2``) and with the two-rename fallback, where a kill between the renames leaves no directory at
the path and loading renames the old copy back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from unittest import mock

import datasets
import numpy as np
import pytest

from hf_realm import hub_io
from hf_realm.corpus_index import RealmBlockIndex
from hf_realm.knn_build import KNNDatastoreWriter
from hf_realm.knn_datastore import KNNDatastore
from hf_realm.world import WORLD_KIND, KnowledgeWorld

from .test_persistence import assert_index_equal, assert_store_equal, make_index, make_store


pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked child")
KILLED = 77


def exchange_supported(tmp_path) -> bool:
    a, b = tmp_path / "probe-a", tmp_path / "probe-b"
    (a / "x").mkdir(parents=True)
    (b / "y").mkdir(parents=True)
    swapped = hub_io._exchange(a, b)
    assert (a / "y").is_dir() == swapped and (b / "x").is_dir() == swapped  # all or nothing
    shutil.rmtree(a), shutil.rmtree(b)
    return swapped


def recorded_steps(save, target) -> list[str]:
    steps = []
    with mock.patch.object(hub_io, "_checkpoint", steps.append):
        save(target)
    return steps


def save_killed_at(save, target, step_index: int) -> None:
    """Run ``save(target)`` in a forked child that dies (`os._exit`, no cleanup) at its ``step_index``-th checkpoint."""
    pid = os.fork()
    if pid == 0:  # the child never returns to pytest
        try:
            count = iter(range(1 << 30))

            def checkpoint(step):
                if next(count) == step_index:
                    os._exit(KILLED)

            hub_io._checkpoint = checkpoint
            save(target)
        finally:
            os._exit(1)  # reached the end: the step was not hit
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the save child hung at step {step_index}")
        time.sleep(0.02)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == KILLED, f"step {step_index}: status {status}"


def kill_at_every_step(tmp_path, save_old, save_new, classify, use_exchange, monkeypatch) -> list[str]:
    """Outcomes of killing ``save_new`` over ``save_old``'s directory at every step; checks the cleanup on the way."""
    monkeypatch.setattr(hub_io, "_USE_EXCHANGE", use_exchange)
    if use_exchange and not exchange_supported(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    target = tmp_path / "d"
    save_old(tmp_path / "probe")
    steps = recorded_steps(save_new, tmp_path / "probe")
    shutil.rmtree(tmp_path / "probe")
    assert ("moved-aside" in steps) == (not use_exchange)
    save_old(target)
    outcomes = []
    for i in range(len(steps)):
        save_killed_at(save_new, target, i)
        outcomes.append(classify(target))
        save_old(target)  # clears the leftovers of the killed save
        assert sorted(os.listdir(tmp_path)) == ["d"], f"leftovers after the kill at {steps[i]!r}"
        assert classify(target) == "old"
    swap = steps.index("swapped")
    assert outcomes == ["old"] * swap + ["new"] * (len(steps) - swap), list(zip(steps, outcomes, strict=True))
    return steps


@pytest.mark.parametrize("use_exchange", [True, False], ids=["exchange", "two-renames"])
def test_kill_index_save_at_every_step(tmp_path, use_exchange, monkeypatch):
    old, new = make_index(0), make_index(1)

    def classify(path):
        loaded = RealmBlockIndex.from_pretrained(path)  # also checks every file's SHA-256
        for name, index in (("old", old), ("new", new)):
            if loaded.corpus["text"] == index.corpus["text"]:
                assert_index_equal(loaded, index)
                return name
        raise AssertionError("neither the old nor the new index")

    steps = kill_at_every_step(tmp_path, old.save_pretrained, new.save_pretrained, classify, use_exchange, monkeypatch)
    assert steps[:5] == ["cleaned", "staged", "written", "hashed", "config"]


@pytest.mark.parametrize("use_exchange", [True, False], ids=["exchange", "two-renames"])
def test_kill_datastore_save_and_writer_commit_at_every_step(tmp_path, use_exchange, monkeypatch):
    old, new = make_store(0), make_store(1, counts=np.arange(50))

    def classify(path):
        loaded = KNNDatastore.from_pretrained(path)
        for name, store in (("old", old), ("new", new)):
            if np.array_equal(loaded.values, store.values):
                assert_store_equal(loaded, store)
                assert (loaded.counts is None) == (store.counts is None)
                return name
        raise AssertionError("neither the old nor the new datastore")

    def write_new(path):  # the streaming writer (KNNDatastore.build, merge_datastores) commits the same way
        writer = KNNDatastoreWriter(path, key_dim=8, with_counts=True)
        for lo in (0, 30):
            sl = slice(lo, lo + 30)
            writer.add(new.keys[sl], new.values[sl], new.provenance[sl], new.counts[sl])
        writer.commit(new.metadata)

    kill_at_every_step(tmp_path, old.save_pretrained, new.save_pretrained, classify, use_exchange, monkeypatch)
    kill_at_every_step(tmp_path, old.save_pretrained, write_new, classify, use_exchange, monkeypatch)


def test_kill_world_save_at_every_step(tmp_path, monkeypatch):
    old = KnowledgeWorld(num_entities=12, seed=1, blocks_per_entity=1)
    new = KnowledgeWorld(num_entities=12, seed=2, blocks_per_entity=1)

    def classify(path):
        world = KnowledgeWorld.from_saved(path)
        meta = json.loads((path / "world_config.json").read_text())
        hub_io.Manifest(path, path, meta, WORLD_KIND.marker).check_all()  # every saved file as recorded
        assert datasets.load_from_disk(str(path / "corpus")).to_list() == world.corpus().to_list()
        return {old.fingerprint(): "old", new.fingerprint(): "new"}[world.fingerprint()]

    kill_at_every_step(tmp_path, old.save_to_disk, new.save_to_disk, classify, True, monkeypatch)


def test_kill_first_save_leaves_nothing_or_everything(tmp_path):
    store = make_store()
    steps = recorded_steps(store.save_pretrained, tmp_path / "probe")
    shutil.rmtree(tmp_path / "probe")
    assert steps == [
        "cleaned",
        "staged",
        "written",
        "hashed",
        "config",
        "swapped",
    ]  # a plain rename: nothing to remove
    for i, step in enumerate(steps):
        save_killed_at(store.save_pretrained, tmp_path / "d", i)
        if step == "swapped":
            assert_store_equal(KNNDatastore.from_pretrained(tmp_path / "d"), store)
        else:
            assert not (tmp_path / "d").exists()
            with pytest.raises(FileNotFoundError, match="no such directory"):
                KNNDatastore.from_pretrained(tmp_path / "d")
        shutil.rmtree(tmp_path / "d", ignore_errors=True)
        store.save_pretrained(tmp_path / "d")
        assert sorted(os.listdir(tmp_path)) == ["d"]
        shutil.rmtree(tmp_path / "d")


def test_failed_save_after_a_kill_between_the_renames_keeps_the_old_index(tmp_path, monkeypatch):
    """Two-rename swap killed after moving the old index aside, then a save that fails: the old copy is put back
    first, never cleaned away as a leftover."""
    monkeypatch.setattr(hub_io, "_USE_EXCHANGE", False)
    old, new = make_index(0), make_index(1)
    old.save_pretrained(tmp_path / "d")
    steps = recorded_steps(new.save_pretrained, tmp_path / "d")
    old.save_pretrained(tmp_path / "d")
    save_killed_at(new.save_pretrained, tmp_path / "d", steps.index("moved-aside"))
    assert not (tmp_path / "d").exists()
    with mock.patch("safetensors.torch.save_file", side_effect=OSError("disk full")):
        with pytest.raises(OSError, match="disk full"):
            new.save_pretrained(tmp_path / "d")
    assert sorted(os.listdir(tmp_path)) == ["d"]  # restored, the killed save's staging removed
    assert_index_equal(RealmBlockIndex.from_pretrained(tmp_path / "d"), old)
