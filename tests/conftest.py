"""Shared fixtures and builders of the test suite: the tiny model configs (vocab 99, hidden 32, 2 layers, 4 heads,
intermediate 37), the toy vocabulary and corpus of the REALM model and open-QA tests, and the environment of the
processes a test launches. Test modules import the builders (``from .conftest import tiny_realm_config``)."""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest
import torch
from transformers import MarianConfig, MarianMTModel, TrainingArguments

import hf_realm
from hf_realm import RealmConfig, RealmForOpenQA, RealmRetriever, RealmTokenizer


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------------------------------------------------
# Tiny models
# ----------------------------------------------------------------------------------------------------------------------

TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37}
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
TINY_READER = {"span_hidden_size": 8, "max_span_width": 3, "reader_beam_size": 2, "searcher_beam_size": 4,
               "reader_seq_len": 24}  # fmt: skip


def tiny_realm_config(**overrides) -> RealmConfig:
    """A tiny `RealmConfig`: vocab 99, BERT hidden 32 / 2 layers / 4 heads / intermediate 37, a 16-d projection;
    ``overrides`` win."""
    return RealmConfig(**{"vocab_size": 99, **TINY_BERT, "retriever_proj_size": 16, **overrides})


def tiny_marian(seed: int = 0, layers: int = 2) -> MarianMTModel:
    """A tiny Marian (vocab 99, d_model 32, 4 heads, ffn 37; pad 0, eos 1) with a non-zero final logits bias, which
    the kNN mixing must see."""
    torch.manual_seed(seed)
    config = MarianConfig(
        vocab_size=99, d_model=32, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, forced_eos_token_id=None, init_std=0.3,
    )  # fmt: skip
    model = MarianMTModel(config).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_(0.0, 1.0)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# The toy vocabulary and corpus of the REALM model and open-QA tests
# ----------------------------------------------------------------------------------------------------------------------

WORDS = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] who what where wrote painted founded born in the a of and was is "
    "hamlet shakespeare mona lisa leonardo rome romulus paris london 1564 1452 city river play painting ?"
).split()
BLOCKS = [
    "shakespeare wrote hamlet in london",
    "leonardo painted the mona lisa",
    "romulus founded rome",
    "paris is a city of the river",
    "shakespeare was born in 1564",
    "leonardo was born in 1452",
]


def toy_tokenizer() -> RealmTokenizer:
    return RealmTokenizer(vocab={w: i for i, w in enumerate(WORDS)})


def toy_openqa_config(**overrides) -> RealmConfig:
    """The tiny config over the toy vocabulary, with a small reader."""
    return tiny_realm_config(**{"vocab_size": len(WORDS), **TINY_READER, "max_position_embeddings": 64, **overrides})


def toy_openqa(tokenizer, config: RealmConfig) -> RealmForOpenQA:
    """A `RealmForOpenQA` over the toy blocks with random (seeded) 4.x-style `block_emb` embeddings."""
    torch.manual_seed(0)
    retriever = RealmRetriever(np.array([b.encode() for b in BLOCKS], dtype=object), tokenizer)
    model = RealmForOpenQA(config, retriever=retriever)
    with torch.no_grad():
        model.block_emb.normal_()
    return model


def tiny_training_args(output_dir, **overrides) -> TrainingArguments:
    """`TrainingArguments` of the tests' few-step CPU `Trainer` runs (no reports, no saves); ``overrides`` win."""
    fields = {"output_dir": str(output_dir), "max_steps": 1, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
              "report_to": [], "use_cpu": True, "save_strategy": "no", "remove_unused_columns": False}  # fmt: skip
    return TrainingArguments(**{**fields, **overrides})


@pytest.fixture(scope="module")
def tokenizer():
    return toy_tokenizer()


# ----------------------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------------------


def subprocess_env(**overrides: str) -> dict[str, str]:
    """The environment of a process a test launches (``python -c``, ``torchrun``, ``accelerate launch``): this one,
    with the hf_realm under test and the repository root first on ``PYTHONPATH`` and the rest of ``PYTHONPATH`` kept,
    so that the launched processes import the same code and see the packages installed there (e.g. with
    ``pip install --target``, as on the GPU machine)."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(hf_realm.__file__)))
    paths = [package_parent, ROOT, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), **overrides}


ACCELERATE_LAUNCHER = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
needs_accelerate = pytest.mark.skipif(not os.path.exists(ACCELERATE_LAUNCHER), reason="accelerate CLI not installed")
"""Marks a test that runs `accelerate launch` (the CLI of the Python running the tests, or the one on PATH)."""


def free_port() -> int:
    """A TCP port free now on the loopback (a launched process group binds it; two test runs at once then do not
    collide on accelerate's default port)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: intra-op threads only add overhead, and on a busy machine they slow everything down many times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
