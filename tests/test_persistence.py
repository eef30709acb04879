"""Saving and loading every hf_realm directory (`hf_realm.hub_io`): whose files a save may replace, tampering, paths
that leave the directory, clear errors on damaged files, leftovers of interrupted saves, the Hub download.

Every refusal and every load error is checked to leave the files on disk byte for byte as they were."""

from __future__ import annotations

import json
import os
import shutil
import struct
from unittest import mock

import datasets
import numpy as np
import pytest
import torch

from hf_realm import hub_io
from hf_realm.corpus_index import RealmBlockIndex
from hf_realm.knn_build import KNNDatastoreWriter
from hf_realm.knn_datastore import KNNDatastore
from hf_realm.world import KnowledgeWorld

from .hub_mock import mock_hub


# ----------------------------------------------------------------------------------------------------------------------
# Helpers (also used by test_save_kill.py)
# ----------------------------------------------------------------------------------------------------------------------

CITIES = ["paris", "rome", "oslo", "lima", "kyiv", "baku", "doha", "riga"]


def make_index(seed: int = 0, n: int = 24, dim: int = 4, **kwargs) -> RealmBlockIndex:
    """A torch-backend index whose texts and embeddings depend on ``seed`` (same count for every seed)."""
    rng = np.random.default_rng(seed)
    texts = [f"block {i:03d} of seed {seed} is about {CITIES[(i + seed) % len(CITIES)]}" for i in range(n)]
    corpus = datasets.Dataset.from_dict({"text": texts, "doc_id": list(range(n))})
    emb = torch.from_numpy(rng.standard_normal((n, dim)).astype(np.float32))
    return RealmBlockIndex(corpus, emb, backend=kwargs.pop("backend", "torch"), **kwargs)


def make_store(seed: int = 0, n: int = 50, dim: int = 8, **kwargs) -> KNNDatastore:
    rng = np.random.default_rng(seed)
    return KNNDatastore(
        keys=rng.standard_normal((n, dim)).astype(np.float16),
        values=rng.integers(0, 99, n),
        provenance=np.stack([np.arange(n), np.zeros(n, dtype=np.int64)], 1),
        **kwargs,
    )


def tree_digest(root) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (hidden ones included) and the list of directories."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root) + "/"] = "dir"
        for name in filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            out[rel] = "link:" + os.readlink(path) if os.path.islink(path) else hub_io.file_sha256(path)
    return out


def assert_index_equal(loaded: RealmBlockIndex, expected: RealmBlockIndex) -> None:
    torch.testing.assert_close(loaded.embeddings, expected.embeddings, rtol=0, atol=0)
    assert loaded.corpus["text"] == expected.corpus["text"]


def assert_store_equal(loaded: KNNDatastore, expected: KNNDatastore) -> None:
    np.testing.assert_array_equal(loaded.keys, expected.keys)
    np.testing.assert_array_equal(loaded.values, expected.values)
    np.testing.assert_array_equal(loaded.provenance, expected.provenance)


def raises_unchanged(root, exc, match, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` raises ``exc`` matching ``match`` and leaves every file under ``root`` as it was."""
    before = tree_digest(root)
    with pytest.raises(exc, match=match) as info:
        fn(*args, **kwargs)
    assert tree_digest(root) == before
    return info.value


def drop_hashes(directory, config_name, keep_files=()):
    """Rewrite a saved config as the earlier format wrote it: no `sha256`, `files` only for ``keep_files``."""
    meta = json.loads((directory / config_name).read_text())
    meta.pop("sha256")
    files = {k: v for k, v in meta.pop("files").items() if k in keep_files}
    if keep_files:
        meta["files"] = files
    (directory / config_name).write_text(json.dumps(meta))


def arrow_file(index_dir):
    (name,) = [n for n in os.listdir(index_dir / "corpus") if n.endswith(".arrow")]
    return index_dir / "corpus" / name


# ----------------------------------------------------------------------------------------------------------------------
# Ownership: a save replaces only what hf_realm wrote
# ----------------------------------------------------------------------------------------------------------------------


def test_index_save_refuses_a_model_directory(tmp_path):
    from transformers import BertConfig, BertModel

    model_dir = tmp_path / "model"
    config = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    )
    BertModel(config).save_pretrained(model_dir)
    err = raises_unchanged(
        tmp_path, FileExistsError, "did not write as a RealmBlockIndex", make_index().save_pretrained, model_dir
    )
    assert "config.json" in str(err) and "model.safetensors" in str(err)
    assert str(model_dir / "index") in str(err)  # the sub-directory to use instead
    make_index().save_pretrained(model_dir / "index")  # which works, beside the model
    assert sorted(os.listdir(model_dir)) == ["config.json", "index", "model.safetensors"]


def test_save_to_a_project_directory_is_refused(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('mine')\n")
    (project / "data.csv").write_text("a,b\n1,2\n")
    monkeypatch.chdir(project)
    index, store, world = make_index(), make_store(), KnowledgeWorld(num_entities=12, seed=1, blocks_per_entity=1)
    for save in (index.save_pretrained, store.save_pretrained, world.save_to_disk, world.save_tokenizer):
        err = raises_unchanged(tmp_path, FileExistsError, "data.csv, src", save, ".")
        assert "sub-directory" in str(err)
    raises_unchanged(tmp_path, FileExistsError, "data.csv, src", KNNDatastoreWriter, ".", key_dim=8)


def test_own_directory_with_a_foreign_file_or_of_another_kind_is_refused(tmp_path):
    make_index().save_pretrained(tmp_path / "idx")
    (tmp_path / "idx" / "notes.txt").write_text("my notes")
    raises_unchanged(tmp_path, FileExistsError, r"\(notes.txt\)", make_index(1).save_pretrained, tmp_path / "idx")
    make_store().save_pretrained(tmp_path / "ds")
    err = raises_unchanged(tmp_path, FileExistsError, "RealmBlockIndex", make_index().save_pretrained, tmp_path / "ds")
    assert "knn_datastore.json" in str(err)
    raises_unchanged(tmp_path, FileExistsError, "index_config.json", make_store().save_pretrained, tmp_path / "idx")
    (tmp_path / "file").write_text("x")
    raises_unchanged(tmp_path, NotADirectoryError, "not a directory", make_index().save_pretrained, tmp_path / "file")


def test_save_replaces_its_own_or_an_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    make_index(0).save_pretrained(tmp_path / "empty")
    make_index(1).save_pretrained(tmp_path / "empty")
    assert_index_equal(RealmBlockIndex.from_pretrained(tmp_path / "empty"), make_index(1))
    meta = json.loads((tmp_path / "empty" / "index_config.json").read_text())
    assert set(meta["files"]) == set(meta["sha256"]) and "embeddings.safetensors" in meta["files"]
    assert any(name.startswith("corpus/") and name.endswith(".arrow") for name in meta["sha256"])
    assert meta["sha256"]["embeddings.safetensors"] == hub_io.file_sha256(tmp_path / "empty/embeddings.safetensors")
    (tmp_path / "empty" / "refresh_state.json").write_text("{}")  # what IndexRefreshCallback adds: still its own
    make_index(2).save_pretrained(tmp_path / "empty")
    assert sorted(os.listdir(tmp_path)) == ["empty"]


def test_save_cleans_only_its_own_leftovers(tmp_path):
    make_index(0).save_pretrained(tmp_path / "idx")
    legacy_tmp = tmp_path / ".idx.tmp-ab1_cd2e"  # names of earlier versions: no pid
    legacy_old = tmp_path / ".idx.old-0123abcd"
    shutil.copytree(tmp_path / "idx", legacy_old)
    (legacy_tmp / "corpus").mkdir(parents=True)
    dead = tmp_path / ".idx.tmp-999999999-0123abcd"  # no such process
    dead.mkdir()
    (dead / "embeddings.safetensors").write_bytes(b"partial")
    users = tmp_path / ".idx.tmp-zzzzzzzz"  # the name matches, the content is not ours
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    alive = tmp_path / f".idx.tmp-{os.getppid()}-0123abcd"  # a live process may still be writing it
    alive.mkdir()
    other = tmp_path / ".other.tmp-ab1_cd2e"  # leftovers of another path are not this save's business
    other.mkdir()
    make_index(1).save_pretrained(tmp_path / "idx")
    assert sorted(os.listdir(tmp_path)) == sorted(["idx", users.name, alive.name, other.name])
    assert (users / "notes.txt").read_text() == "mine"


def test_world_and_tokenizer_saves_replace_their_own_only(tmp_path):
    world = KnowledgeWorld(num_entities=12, seed=1, blocks_per_entity=1)
    world.save_tokenizer(tmp_path / "tok")
    world.save_tokenizer(tmp_path / "tok")
    assert sorted(os.listdir(tmp_path / "tok")) == ["tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    world.save_to_disk(tmp_path / "world")
    meta = json.loads((tmp_path / "world" / "world_config.json").read_text())
    assert meta["sha256"]["tokenizer/vocab.txt"] == hub_io.file_sha256(tmp_path / "world/tokenizer/vocab.txt")
    raises_unchanged(tmp_path, FileExistsError, "world_config.json", world.save_tokenizer, tmp_path / "world")
    raises_unchanged(tmp_path, FileExistsError, "vocab.txt", world.save_to_disk, tmp_path / "tok")
    assert sorted(os.listdir(tmp_path)) == ["tok", "world"]


# ----------------------------------------------------------------------------------------------------------------------
# Same-size tampering
# ----------------------------------------------------------------------------------------------------------------------


def test_changed_float_in_embeddings_is_detected(tmp_path):
    index = make_index()
    index.save_pretrained(tmp_path / "idx")
    file = tmp_path / "idx" / "embeddings.safetensors"
    data = bytearray(file.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]  # safetensors: u64 header length, header, then the raw tensor
    assert struct.unpack("<f", data[start : start + 4])[0] == index.embeddings[0, 0].item()
    data[start : start + 4] = struct.pack("<f", 123.0)
    file.write_bytes(bytes(data))
    raises_unchanged(
        tmp_path,
        ValueError,
        "embeddings.safetensors is altered: its SHA-256",
        RealmBlockIndex.from_pretrained,
        file.parent,
    )
    # verify_hashes=False is the documented opt-out: sizes only, the altered value is served
    assert RealmBlockIndex.from_pretrained(file.parent, verify_hashes=False).embeddings[0, 0].item() == 123.0


def test_edited_corpus_text_is_detected(tmp_path):
    make_index().save_pretrained(tmp_path / "idx")
    file = arrow_file(tmp_path / "idx")
    data = file.read_bytes()
    assert data.count(b"is about paris") >= 1
    file.write_bytes(data.replace(b"is about paris", b"is about xaris"))  # same size
    raises_unchanged(tmp_path, ValueError, r"\.arrow is altered", RealmBlockIndex.from_pretrained, tmp_path / "idx")


def test_swapped_corpus_of_the_same_count_is_detected(tmp_path):
    make_index(0).save_pretrained(tmp_path / "a")
    make_index(5).save_pretrained(tmp_path / "b")  # same count, other texts
    shutil.rmtree(tmp_path / "a" / "corpus")
    shutil.copytree(tmp_path / "b" / "corpus", tmp_path / "a" / "corpus")
    raises_unchanged(tmp_path, ValueError, "corpus/.* altered", RealmBlockIndex.from_pretrained, tmp_path / "a")


def test_changed_datastore_key_is_detected(tmp_path):
    path = make_store().save_pretrained(tmp_path / "ds")
    keys = path / "keys.npy"
    data = bytearray(keys.read_bytes())
    data[-2:] = np.float16(7.0).tobytes()
    keys.write_bytes(bytes(data))
    raises_unchanged(tmp_path, ValueError, "keys.npy is altered", KNNDatastore.from_pretrained, path)
    (path / "counts.npy").write_bytes(b"not recorded")  # a file the save did not write
    raises_unchanged(
        tmp_path, ValueError, "counts.npy is not recorded", KNNDatastore.from_pretrained, path, verify_hashes=False
    )


def test_directories_saved_without_hashes_still_load(tmp_path):
    index, store = make_index(), make_store(counts=np.arange(1, 51))
    index.save_pretrained(tmp_path / "idx")
    drop_hashes(tmp_path / "idx", "index_config.json", keep_files=("embeddings.safetensors",))  # format of 0.x
    assert_index_equal(RealmBlockIndex.from_pretrained(tmp_path / "idx"), index)
    path = store.save_pretrained(tmp_path / "ds")
    drop_hashes(path, "knn_datastore.json")
    loaded = KNNDatastore.from_pretrained(path)
    assert_store_equal(loaded, store)
    np.testing.assert_array_equal(loaded.counts, np.arange(1, 51))


# ----------------------------------------------------------------------------------------------------------------------
# Nothing outside the saved directory is read
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hashed", [True, False])
def test_corpus_state_naming_a_file_outside_is_refused(tmp_path, hashed):
    make_index(0).save_pretrained(tmp_path / "idx")
    elsewhere = tmp_path / "elsewhere"
    make_index(3).save_pretrained(tmp_path / "other")
    elsewhere.mkdir()
    shutil.copy(arrow_file(tmp_path / "other"), elsewhere / "x.arrow")  # a readable corpus of the same count
    if not hashed:
        drop_hashes(tmp_path / "idx", "index_config.json", keep_files=("embeddings.safetensors",))
    state_file = tmp_path / "idx" / "corpus" / "state.json"
    state = json.loads(state_file.read_text())
    state["_data_files"] = [{"filename": "../../elsewhere/x.arrow"}]
    state_file.write_text(json.dumps(state))
    err = raises_unchanged(
        tmp_path, ValueError, "a path outside", RealmBlockIndex.from_pretrained, tmp_path / "idx", verify_hashes=False
    )
    assert "../../elsewhere/x.arrow" in str(err)


def test_files_entry_outside_does_not_leak_its_size(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 12345)
    make_index().save_pretrained(tmp_path / "root" / "idx")
    path = make_store().save_pretrained(tmp_path / "root" / "ds")
    for directory, name, load in [
        (tmp_path / "root" / "idx", "index_config.json", RealmBlockIndex.from_pretrained),
        (path, "knn_datastore.json", KNNDatastore.from_pretrained),
    ]:
        for entry in ["../../secret", str(secret)]:
            meta = json.loads((directory / name).read_text())
            meta["files"][entry], meta["sha256"][entry] = 1, "0" * 64
            (directory / name).write_text(json.dumps(meta))
            err = raises_unchanged(tmp_path, ValueError, "a path outside the directory: refused", load, directory)
            assert "12345" not in str(err) and "bytes" not in str(err)
            meta["files"].pop(entry), meta["sha256"].pop(entry)
            (directory / name).write_text(json.dumps(meta))


def test_link_out_of_the_directory_is_refused(tmp_path):
    make_index().save_pretrained(tmp_path / "idx")
    outside = tmp_path / "outside.safetensors"
    shutil.move(tmp_path / "idx" / "embeddings.safetensors", outside)
    os.symlink(outside, tmp_path / "idx" / "embeddings.safetensors")
    raises_unchanged(tmp_path, ValueError, "links outside", RealmBlockIndex.from_pretrained, tmp_path / "idx")


def test_hub_snapshot_links_into_the_cache_are_followed(tmp_path):
    """A Hub snapshot is a folder of links into the repo's `blobs/`: those stay inside the repo cache and load."""
    index = make_index()
    index.save_pretrained(tmp_path / "src")
    repo = tmp_path / "cache" / "datasets--me--idx"
    snapshot = repo / "snapshots" / "abc123"
    for rel, file in hub_io._walk_files(tmp_path / "src"):
        blob = repo / "blobs" / hub_io.file_sha256(file)
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(file, blob)
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, (snapshot / rel).parent), snapshot / rel)
    with mock.patch("huggingface_hub.snapshot_download", return_value=str(snapshot)) as download:
        assert_index_equal(RealmBlockIndex.from_pretrained("me/idx"), index)
    assert download.call_args.args == ("me/idx",) and download.call_args.kwargs["repo_type"] == "dataset"


# ----------------------------------------------------------------------------------------------------------------------
# Clear errors on damaged or missing files
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hashed", [True, False])
def test_truncated_corpus_arrow_names_the_file(tmp_path, hashed):
    make_index().save_pretrained(tmp_path / "idx")
    if not hashed:
        drop_hashes(tmp_path / "idx", "index_config.json", keep_files=("embeddings.safetensors",))
    file = arrow_file(tmp_path / "idx")
    file.write_bytes(file.read_bytes()[:-100])
    match = (
        r"\.arrow is truncated or altered: \d+ bytes, expected" if hashed else r"cannot read the corpus .*\.arrow \("
    )
    raises_unchanged(tmp_path, ValueError, match, RealmBlockIndex.from_pretrained, tmp_path / "idx")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.pop("count"), r"index_config.json lacks \['count'\]"),
        (lambda m: m.update(dim="4"), r"index_config.json: 'dim' is '4'; expected int"),
        (None, "index_config.json is not valid JSON"),
    ],
)
def test_bad_index_config(tmp_path, edit, match):
    make_index().save_pretrained(tmp_path / "idx")
    config = tmp_path / "idx" / "index_config.json"
    if edit is None:
        config.write_text(config.read_text()[:-20])
    else:
        meta = json.loads(config.read_text())
        edit(meta)
        config.write_text(json.dumps(meta))
    raises_unchanged(tmp_path, ValueError, match, RealmBlockIndex.from_pretrained, tmp_path / "idx")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.pop("num_entries"), r"knn_datastore.json lacks \['num_entries'\]"),
        (lambda m: m.update(files=[]), "'files' must map file names to byte sizes"),
        (None, "knn_datastore.json is not valid JSON"),
    ],
)
def test_bad_datastore_config(tmp_path, edit, match):
    path = make_store().save_pretrained(tmp_path / "ds")
    config = path / "knn_datastore.json"
    if edit is None:
        config.write_text("{not json")
    else:
        meta = json.loads(config.read_text())
        edit(meta)
        config.write_text(json.dumps(meta))
    raises_unchanged(tmp_path, ValueError, match, KNNDatastore.from_pretrained, path)


def test_missing_local_path_is_a_clear_error(tmp_path):
    for load in (RealmBlockIndex.from_pretrained, KNNDatastore.from_pretrained):
        raises_unchanged(tmp_path, FileNotFoundError, "nope: no such directory", load, tmp_path / "nope")
        raises_unchanged(tmp_path, FileNotFoundError, "no such directory", load, "./also/not/here")
    # a bare name is a possible repo id: asked of the Hub, and an answer of "not there" names the path
    from huggingface_hub.errors import LocalEntryNotFoundError

    with mock.patch("huggingface_hub.snapshot_download", side_effect=LocalEntryNotFoundError("offline")):
        for load in (RealmBlockIndex.from_pretrained, KNNDatastore.from_pretrained):
            raises_unchanged(tmp_path, FileNotFoundError, "my-index is not a local directory", load, "my-index")
    file = tmp_path / "a-file"
    file.write_text("x")
    raises_unchanged(tmp_path, NotADirectoryError, "is a file", RealmBlockIndex.from_pretrained, file)
    with pytest.raises(FileNotFoundError, match="not a saved world"):
        KnowledgeWorld.from_saved(tmp_path / "nope")


def _compressed_store(seed=0):
    store = make_store(seed)
    return KNNDatastore(
        values=store.values,
        provenance=store.provenance,
        projection={"matrix": np.eye(8, 4, dtype=np.float32), "bias": np.zeros(4, np.float32)},
        pq={"codes": np.zeros((50, 2), np.uint8), "codebooks": np.ones((2, 256, 2), np.float32)},
    )


@pytest.mark.parametrize("name", ["pq.npz", "projection.npz"])
@pytest.mark.parametrize("hashed", [True, False])
def test_truncated_npz_names_the_file(tmp_path, name, hashed):
    store = _compressed_store()
    path = store.save_pretrained(tmp_path / "ds")
    loaded = KNNDatastore.from_pretrained(path)
    np.testing.assert_array_equal(loaded.projection["matrix"], store.projection["matrix"])
    np.testing.assert_array_equal(loaded.pq["codebooks"], store.pq["codebooks"])
    if not hashed:
        drop_hashes(path, "knn_datastore.json")
    file = path / name
    file.write_bytes(file.read_bytes()[:-50])
    match = f"{name} is truncated or altered: " if hashed else rf"{name} is truncated or corrupt \(BadZipFile"
    raises_unchanged(tmp_path, ValueError, match, KNNDatastore.from_pretrained, path)


@pytest.mark.parametrize("hashed", [True, False])
def test_truncated_faiss_files_name_the_file(tmp_path, hashed):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    n = 400
    corpus = datasets.Dataset.from_dict({"text": [f"b{i}" for i in range(n)]})
    index = RealmBlockIndex(
        corpus, rng.standard_normal((n, 8)).astype(np.float32), backend="faiss", index_factory="IVF4,Flat"
    )
    index.save_pretrained(tmp_path / "idx")
    store = make_store(n=100).build_index("faiss-flat", device="cpu")
    path = store.save_pretrained(tmp_path / "ds")
    if not hashed:
        drop_hashes(tmp_path / "idx", "index_config.json", keep_files=("embeddings.safetensors", "faiss.index"))
        drop_hashes(path, "knn_datastore.json")
    for file in (tmp_path / "idx" / "faiss.index", path / "index.faiss"):
        file.write_bytes(file.read_bytes()[:-64])
    # the earlier format recorded the size of faiss.index; the datastore's index.faiss reaches faiss' own check
    raises_unchanged(
        tmp_path, ValueError, "faiss.index is truncated or altered", RealmBlockIndex.from_pretrained, tmp_path / "idx"
    )
    match = (
        "index.faiss is truncated or altered" if hashed else r"cannot read .*index\.faiss: .*(truncated|read error)"
    )
    raises_unchanged(tmp_path, ValueError, match, KNNDatastore.from_pretrained, path)


# ----------------------------------------------------------------------------------------------------------------------
# One Hub upload
# ----------------------------------------------------------------------------------------------------------------------


def test_push_to_hub_uploads_the_saved_directory(tmp_path):
    index, store = make_index(), make_store()
    with mock_hub(tmp_path / "remote") as repos:
        url = index.push_to_hub("me/idx", repo_type="model", path_in_repo="index")
        store.push_to_hub("me/ds")
    assert url == "https://huggingface.co/me/idx/commit/0"
    assert_index_equal(RealmBlockIndex.from_pretrained(os.path.join(repos["me/idx"], "index")), index)
    assert_store_equal(KNNDatastore.from_pretrained(repos["me/ds"]), store)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_remove_owned_directory_leaves_anything_else(tmp_path):
    """Merged build shards are removed only when they hold nothing but a datastore's files."""
    from hf_realm.knn_build import DATASTORE_KIND

    store = KNNDatastore(keys=np.eye(3, dtype=np.float16), values=np.array([1, 2, 3]))
    ours, theirs = tmp_path / "rank-00000", tmp_path / "rank-00001"
    store.save_pretrained(ours)
    store.save_pretrained(theirs)
    (theirs / "notes.txt").write_text("a user's file")
    assert hub_io.remove_owned_directory(ours, DATASTORE_KIND) is True
    assert not ours.exists()
    assert hub_io.remove_owned_directory(theirs, DATASTORE_KIND) is False
    assert (theirs / "notes.txt").read_text() == "a user's file" and (theirs / "values.npy").is_file()
    assert hub_io.remove_owned_directory(tmp_path / "missing", DATASTORE_KIND) is False
