"""The retriever's start from a pretrained encoder: mean pooling (`retriever_pooling="mean"`), the pooling read from a
sentence-transformers folder, and the projection started from the corpus' principal directions
(`init_retriever_projection`), each against a float64 reference."""

import importlib.util
import json
import logging
import os
import sys
import types

import datasets
import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from hf_realm import (
    RealmConfig,
    RealmEmbedder,
    RealmForInverseClozeTask,
    RealmForOpenQA,
    init_retriever_projection,
)
from hf_realm.modeling_realm import mean_pool, sentence_transformers_pooling


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    return BertModel(BertConfig(**TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()


def st_folder(path, bert, modes=("pooling_mode_mean_tokens",), pooling_path="1_Pooling"):
    """A sentence-transformers folder: the encoder, modules.json and the pooling module's config."""
    bert.save_pretrained(path)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": pooling_path, "type": "sentence_transformers.models.Pooling"},
    ]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / pooling_path).mkdir(exist_ok=True)
    config = {k: k in modes for k in ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens")}
    (path / pooling_path / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **config}))
    return path


def corpus(n=60, seed=0):
    rng = np.random.default_rng(seed)
    rows = [[2, *rng.integers(5, 99, size=int(rng.integers(3, 12))).tolist(), 3] for _ in range(n)]
    return datasets.Dataset.from_dict({"input_ids": rows})


def test_mean_pooling_against_float64():
    embedder = RealmEmbedder(RealmConfig(**TINY, retriever_proj_size=8, retriever_pooling="mean")).eval()
    ids = torch.tensor([[2, 10, 11, 12, 3], [2, 20, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        got = embedder(ids, attention_mask=mask).projected_score.double()
        hidden = embedder.realm(ids, attention_mask=mask).last_hidden_state.double()
    m = mask.double().unsqueeze(-1)
    pooled = (hidden * m).sum(1) / m.sum(1)
    pooled = pooled / pooled.norm(dim=-1, keepdim=True)
    dense, norm = embedder.cls.dense, embedder.cls.LayerNorm
    x = pooled @ dense.weight.double().T + dense.bias.double()
    x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps)
    expected = x * norm.weight.double() + norm.bias.double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # padding is ignored: the second row alone, unpadded, embeds the same
    with torch.no_grad():
        alone = embedder(ids[1:, :3]).projected_score
    torch.testing.assert_close(alone, got[1:].float(), rtol=1e-5, atol=1e-5)
    # and the [CLS] pooling of REALM gives something else on the same weights
    embedder.config.retriever_pooling = "cls"
    with torch.no_grad():
        assert not torch.allclose(embedder(ids, attention_mask=mask).projected_score, got.float(), atol=1e-3)


def test_mean_pool_without_mask_and_in_bf16():
    hidden = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(0))
    expected = hidden.double().mean(1)
    expected = expected / expected.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(mean_pool(hidden).double(), expected)
    got = mean_pool(hidden.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=2e-2)


def test_config_refuses_an_unknown_pooling_and_saves_its_pooling(tmp_path):
    with pytest.raises(ValueError, match=r"retriever_pooling: expected one of \['cls', 'mean'\], got 'max'"):
        RealmConfig(**TINY, retriever_pooling="max")
    RealmEmbedder(RealmConfig(**TINY, retriever_proj_size=8, retriever_pooling="mean")).save_pretrained(tmp_path)
    assert RealmEmbedder.from_pretrained(tmp_path).config.retriever_pooling == "mean"
    assert RealmConfig().retriever_pooling == "cls"  # REALM and every 4.x checkpoint


def test_sentence_transformers_pooling_read_from_the_folder(tmp_path, caplog):
    bert = tiny_bert()
    mean_dir = st_folder(tmp_path / "mean", bert)
    cls_dir = st_folder(tmp_path / "cls", bert, modes=("pooling_mode_cls_token",), pooling_path="pool")
    max_dir = st_folder(tmp_path / "max", bert, modes=("pooling_mode_max_tokens",))
    plain = tmp_path / "plain"
    bert.save_pretrained(plain)
    assert sentence_transformers_pooling(mean_dir) == "mean"
    assert sentence_transformers_pooling(cls_dir) is None  # its [CLS] pooling is not BERT's pooler: REALM's stays
    assert sentence_transformers_pooling(plain) is None
    assert sentence_transformers_pooling("no-such/repository") is None  # nothing downloaded
    with caplog.at_level(logging.WARNING, logger="hf_realm"):
        assert sentence_transformers_pooling(max_dir) is None
    assert "['pooling_mode_max_tokens'] has no retriever_pooling; 'cls' kept" in caplog.text

    # from_bert takes the folder's pooling; an explicit one wins; a plain BERT keeps REALM's
    assert RealmEmbedder.from_bert(str(mean_dir), retriever_proj_size=8).config.retriever_pooling == "mean"
    assert (
        RealmEmbedder.from_bert(mean_dir, retriever_proj_size=8, retriever_pooling="cls").config.retriever_pooling
        == "cls"
    )
    assert RealmEmbedder.from_bert(str(plain), retriever_proj_size=8).config.retriever_pooling == "cls"
    qa = RealmForOpenQA.from_bert(str(mean_dir), retriever_proj_size=8, num_block_records=0)
    assert qa.embedder.config.retriever_pooling == "mean"


def pca_reference(embedder, dataset, dim):
    """float64: the pooled block vectors, their mean and top-``dim`` principal directions (numpy SVD)."""
    rows = []
    with torch.no_grad():
        for ids in dataset["input_ids"]:
            out = embedder.realm(torch.tensor([ids]))
            pooled = (
                mean_pool(out.last_hidden_state) if embedder.config.retriever_pooling == "mean" else out.pooler_output
            )
            rows.append(pooled[0].double().numpy())
    x = np.stack(rows)
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    return x, mean, vt[:dim], s


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_projection_started_from_the_principal_directions(pooling):
    embedder = RealmEmbedder(RealmConfig(**TINY, retriever_proj_size=6, retriever_pooling=pooling)).eval()
    data = corpus()
    stats = init_retriever_projection(embedder, data, batch_size=7, show_progress=False)
    assert not embedder.training
    x, mean, directions, s = pca_reference(embedder, data, 6)
    assert stats["num_blocks"] == len(data)
    assert stats["explained_variance"] == pytest.approx(float((s[:6] ** 2).sum() / (s**2).sum()), rel=1e-5)
    weight = embedder.cls.dense.weight.detach().double().numpy()
    np.testing.assert_allclose(weight @ weight.T, np.eye(6), atol=1e-5)  # orthonormal rows
    signs = np.sign((weight * directions).sum(1))  # an SVD's directions are defined up to sign
    np.testing.assert_allclose(weight, directions * signs[:, None], atol=2e-4)
    projected = x @ weight.T + embedder.cls.dense.bias.detach().double().numpy()
    np.testing.assert_allclose(projected, ((x - mean) @ directions.T) * signs, atol=2e-4)  # centred scores
    assert torch.equal(embedder.cls.LayerNorm.weight, torch.ones(6))
    assert torch.equal(embedder.cls.LayerNorm.bias, torch.zeros(6))


def test_projection_start_samples_blocks_and_refuses_too_few():
    embedder = RealmEmbedder(RealmConfig(**TINY, retriever_proj_size=6, retriever_pooling="mean")).eval()
    data = corpus(60)
    stats = init_retriever_projection(embedder, data, max_blocks=20, seed=3, show_progress=False)
    assert stats["num_blocks"] == 20
    picked = np.sort(np.random.default_rng(3).choice(60, size=20, replace=False))
    _, _, directions, _ = pca_reference(embedder, data.select(picked), 6)
    weight = embedder.cls.dense.weight.detach().double().numpy()
    np.testing.assert_allclose(np.abs((weight * directions).sum(1)), np.ones(6), atol=1e-4)
    with pytest.raises(ValueError, match="needs more than 6 blocks to fit its start on, got 5"):
        init_retriever_projection(embedder, corpus(5), show_progress=False)
    with pytest.raises(ValueError, match="max_blocks must be > retriever_proj_size=6, got 6"):
        init_retriever_projection(embedder, data, max_blocks=6, show_progress=False)
    wide = RealmEmbedder(RealmConfig(**TINY, retriever_proj_size=40))
    with pytest.raises(ValueError, match=r"retriever_proj_size=40 is wider than the pooled vectors \(32\)"):
        init_retriever_projection(wide, data, show_progress=False)
    with pytest.raises(TypeError, match="expected a RealmEmbedder or a model with an `embedder`, got Linear"):
        init_retriever_projection(torch.nn.Linear(2, 2), data, show_progress=False)


def test_projection_start_of_both_towers_of_a_model():
    config = RealmConfig(**TINY, retriever_proj_size=6, retriever_pooling="mean", share_embedders=False)
    torch.manual_seed(0)
    model = RealmForInverseClozeTask(config).eval()
    model.query_embedder.realm.load_state_dict(model.embedder.realm.state_dict())  # as from_bert starts them
    model.train()  # the towers' mode is kept (the fit itself runs in eval mode: no dropout)
    init_retriever_projection(model, corpus(), show_progress=False)
    assert model.embedder.training and model.query_embedder.training
    model.eval()
    for tower in (model.embedder, model.query_embedder):
        _, _, directions, _ = pca_reference(tower, corpus(), 6)
        weight = tower.cls.dense.weight.detach().double().numpy()
        np.testing.assert_allclose(np.abs((weight * directions).sum(1)), np.ones(6), atol=1e-4)


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"{name}_for_start", os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_train_realm_ict_starts_from_the_folder_pooling_and_the_corpus(tmp_path):
    train_realm = load_example("train_realm")
    folder = st_folder(tmp_path / "st", tiny_bert())
    data = corpus()
    config = RealmConfig(**TINY, retriever_proj_size=6)
    args = types.SimpleNamespace(resume_from_checkpoint=None, seed=0, device=torch.device("cpu"), disable_tqdm=True,
                                 ict_steps=0)  # fmt: skip
    model_args = types.SimpleNamespace(bert_name_or_path=str(folder), retriever_pooling=None, init_projection="pca")
    model = train_realm.train_ict(model_args, args, config, data, None)
    assert model.config.retriever_pooling == "mean"
    _, _, directions, _ = pca_reference(model.embedder.eval(), data, 6)
    weight = model.embedder.cls.dense.weight.detach().double().numpy()
    np.testing.assert_allclose(np.abs((weight * directions).sum(1)), np.ones(6), atol=1e-4)

    model_args.init_projection, model_args.retriever_pooling = "random", "cls"
    drawn = train_realm.train_ict(model_args, args, config, data, None)
    assert drawn.config.retriever_pooling == "cls"
    assert not torch.allclose(drawn.embedder.cls.dense.weight, model.embedder.cls.dense.weight)


@pytest.mark.parametrize("name", ["train_realm", "finetune_openqa", "build_index"])
def test_examples_refuse_an_unknown_start_when_parsing(name):
    module = load_example(name)
    parse = module.parse if name == "build_index" else module.parse_args
    with pytest.raises(ValueError, match="--init_projection: expected 'pca' or 'random', got 'svd'"):
        parse(["--init_projection", "svd"])
    if name != "build_index":
        with pytest.raises(ValueError, match="--retriever_pooling: expected 'cls' or 'mean', got 'max'"):
            parse(["--retriever_pooling", "max"])


def test_processes_start_from_process_zero_projection(tmp_path):
    """Under torch.distributed every process fits the projection; process 0's result is broadcast to all (here each
    process samples other blocks, so their own fits differ)."""
    import subprocess

    from .conftest import free_port, subprocess_env
    from .scripts.projection_broadcast_worker import setup

    worker = os.path.join(ROOT, "tests", "scripts", "projection_broadcast_worker.py")
    result = subprocess.run([sys.executable, worker, str(free_port()), str(tmp_path)], env=subprocess_env(
        OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    embedder, data = setup(0)
    init_retriever_projection(embedder, data, max_blocks=20, seed=0, show_progress=False)  # process 0's fit, alone
    other, _ = setup(0)
    init_retriever_projection(other, data, max_blocks=20, seed=1, show_progress=False)  # process 1's own fit
    assert not torch.allclose(other.cls.dense.weight, embedder.cls.dense.weight, atol=1e-3)
    for state in got:
        for name, value in embedder.cls.state_dict().items():
            torch.testing.assert_close(state[name], value, rtol=0, atol=1e-6)
