"""RealmForMaskedLM and RealmForInverseClozeTask against float64 brute force."""

import math

import pytest
import torch

from hf_realm import RealmEmbedder, RealmForInverseClozeTask, RealmForMaskedLM, RealmKnowledgeAugEncoder

from .conftest import NO_DROPOUT, tiny_realm_config


VOCAB = 60
BLOCKS = [[2, 10 + i, 3, 30 + i, 31 + (i % 3), 32, 3] for i in range(9)]  # [CLS] title [SEP] body [SEP]


class ExactIndex:
    """Exact MIPS over doc embeddings computed once (the stale cache REALM searches)."""

    def __init__(self, embedder):
        with torch.no_grad():
            ids = torch.tensor(BLOCKS)
            types = torch.zeros_like(ids)
            types[:, 3:] = 1
            self.emb = embedder(ids, token_type_ids=types).projected_score.double()
        self.calls = 0

    def search(self, q, k):
        self.calls += 1
        return (q.double() @ self.emb.T).topk(k)

    def block_inputs(self, ids):
        ids = torch.tensor([BLOCKS[i] for i in ids])
        types = torch.zeros_like(ids)
        types[:, 3:] = 1
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": types}


def config(**kw):
    return tiny_realm_config(
        **{"vocab_size": VOCAB, "num_candidates": 4, **NO_DROPOUT, "max_position_embeddings": 64, **kw}
    )


def batch():
    input_ids = torch.tensor([[2, 40, 41, 4, 4, 42, 3], [2, 43, 4, 44, 3, 0, 0]])
    attention_mask = (torch.arange(7) < torch.tensor([[7], [5]])).long()
    labels = torch.full_like(input_ids, -100)
    labels[0, 3], labels[0, 4], labels[1, 2] = 31, 32, 35
    return input_ids, attention_mask, labels


def reference_loss(model, input_ids, attention_mask, labels, candidates):
    """Brute force in float64: each (query, candidate) pair on its own, full MLM head, explicit marginalisation."""
    model = model.double()
    total, count = 0.0, 0
    enc = model.encoder
    for b in range(input_ids.shape[0]):
        x = input_ids[b][attention_mask[b].bool()]
        q = model.embedder(x[None]).projected_score[0]
        docs = []
        for block_id in candidates[b]:
            ids = torch.tensor(BLOCKS[block_id])
            types = torch.zeros_like(ids)
            types[3:] = 1
            docs.append(model.embedder(ids[None], token_type_ids=types[None]).projected_score[0])
        scores = [0.0] + [float(q @ d) for d in docs]
        log_z = math.log(sum(math.exp(s) for s in scores))
        seqs = [x.tolist()] + [x.tolist() + BLOCKS[i][1:] for i in candidates[b]]
        for p in torch.nonzero(labels[b] != -100).flatten().tolist():
            terms = []
            for c, seq in enumerate(seqs):
                types = torch.zeros(len(seq), dtype=torch.long)
                types[len(x) :] = 1
                logits = enc(torch.tensor(seq)[None, None], token_type_ids=types[None, None]).logits[0, p]
                log_p_y = logits.log_softmax(-1)[labels[b, p]].item()
                terms.append(scores[c] - log_z + log_p_y)
            m = max(terms)
            total += m + math.log(sum(math.exp(t - m) for t in terms))
            count += 1
    return -total / count


def test_loss_equals_float64_brute_force_over_all_candidates():
    torch.manual_seed(0)
    model = RealmForMaskedLM(config()).eval()
    model.index = ExactIndex(model.embedder)
    input_ids, attention_mask, labels = batch()
    source = torch.tensor([2, -1])
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, labels=labels, source_block_id=source)
        candidates = out.retrieved_block_ids[:, 1:].tolist()
        expected = reference_loss(model, input_ids, attention_mask, labels, candidates)
    assert out.loss.item() == pytest.approx(expected, abs=1e-5)
    assert out.masked_positions.tolist() == [[0, 3], [0, 4], [1, 2]]


def test_candidates_are_the_index_top_k_without_the_source_block():
    torch.manual_seed(1)
    model = RealmForMaskedLM(config()).eval()
    model.index = index = ExactIndex(model.embedder)
    input_ids, attention_mask, labels = batch()
    with torch.no_grad():
        q = model.embedder(input_ids, attention_mask=attention_mask).projected_score
        top = (q.double() @ index.emb.T).topk(5).indices
        source = top[:, 1].clone()  # a source block that the search does retrieve (2nd best)
        source[1] = -1  # and one query without a source
        out = model(input_ids, attention_mask=attention_mask, labels=labels, source_block_id=source)
    ids = out.retrieved_block_ids
    assert (ids[:, 0] == -1).all()  # null document first
    assert ids[0, 1:].tolist() == [top[0, 0].item()] + top[0, 2:4].tolist()
    assert ids[1, 1:].tolist() == top[1, :3].tolist()
    assert (out.retrieval_logits[:, 0] == 0).all()
    # the candidates' scores are re-embedded with the current doc encoder, equal to the cache here
    expected = torch.stack([q[b].double() @ index.emb[ids[b, 1:]].T for b in range(2)])
    torch.testing.assert_close(out.retrieval_logits[:, 1:].double(), expected, atol=1e-5, rtol=1e-5)


def test_gradients_reach_both_towers_and_the_encoder():
    torch.manual_seed(0)
    model = RealmForMaskedLM(config(share_embedders=False)).train()
    model.index = ExactIndex(model.embedder)
    input_ids, attention_mask, labels = batch()
    model(input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    for tower in (model.query_embedder, model.embedder, model.encoder.realm):
        grads = [p.grad for p in tower.parameters() if p.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0


def test_null_logits_are_the_closed_book_prediction():
    torch.manual_seed(0)
    model = RealmForMaskedLM(config()).eval()
    model.index = ExactIndex(model.embedder)
    input_ids, attention_mask, labels = batch()
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, labels=labels)
        alone = model.encoder(input_ids[0:1, None, :7], token_type_ids=torch.zeros(1, 1, 7, dtype=torch.long)).logits
    torch.testing.assert_close(out.null_logits[0], alone[0, 3].log_softmax(-1), atol=1e-5, rtol=1e-5)
    gold = torch.tensor([31, 32, 35])
    torch.testing.assert_close(out.null_gold_log_probs, out.null_logits.gather(1, gold[:, None])[:, 0])
    torch.testing.assert_close(out.gold_log_probs, out.logits.gather(1, gold[:, None])[:, 0])


def test_sub_models_load_on_their_own(tmp_path):
    model = RealmForMaskedLM(config(share_embedders=False))
    model.save_pretrained(tmp_path)
    reloaded = RealmForMaskedLM.from_pretrained(tmp_path)
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())
    emb = RealmEmbedder.from_pretrained(tmp_path / "embedder")
    assert torch.equal(emb.cls.dense.weight, model.embedder.cls.dense.weight)
    query = RealmEmbedder.from_pretrained(tmp_path / "query_embedder")
    assert torch.equal(query.cls.dense.weight, model.query_embedder.cls.dense.weight)
    enc = RealmKnowledgeAugEncoder.from_pretrained(tmp_path / "encoder")
    assert torch.equal(
        enc.realm.encoder.layer[1].output.dense.weight, model.encoder.realm.encoder.layer[1].output.dense.weight
    )


def test_bad_input():
    with pytest.raises(ValueError, match="num_candidates must be >= 2"):
        RealmForMaskedLM(config(num_candidates=1))
    model = RealmForMaskedLM(config())
    input_ids, attention_mask, labels = batch()
    with pytest.raises(ValueError, match="needs a corpus index"):
        model(input_ids, attention_mask=attention_mask, labels=labels)
    model.index = ExactIndex(model.embedder)
    with pytest.raises(ValueError, match="no masked position"):
        model(input_ids, attention_mask=attention_mask, labels=torch.full_like(labels, -100))
    bad = labels.clone()
    bad[1, 6] = 7
    with pytest.raises(ValueError, match="outside the query"):
        model(input_ids, attention_mask=attention_mask, labels=bad)
    with pytest.raises(ValueError, match="labels must have the shape of input_ids"):
        model(input_ids, attention_mask=attention_mask, labels=labels[:, :5])
    with pytest.raises(
        ValueError, match=r"candidate_block_ids must have shape \(batch_size=2, num_candidates - 1=3\)"
    ):
        model(input_ids, attention_mask=attention_mask, labels=labels, candidate_block_ids=torch.zeros(2, 2).long())
    small = RealmForMaskedLM(config(num_candidates=12))
    small.index = ExactIndex(small.embedder)
    with pytest.raises(RuntimeError):  # topk over 9 blocks cannot give 11
        small(input_ids, attention_mask=attention_mask, labels=labels)


def test_inverse_cloze_task_against_float64():
    torch.manual_seed(0)
    model = RealmForInverseClozeTask(config()).eval()
    queries = torch.tensor([[2, 31, 32, 3], [2, 34, 35, 3], [2, 36, 30, 3]])
    blocks = torch.tensor(BLOCKS[:3])
    with torch.no_grad():
        out = model(query_input_ids=queries, block_input_ids=blocks)
        m = model.double()
        q = m.embedder(queries).projected_score
        d = m.embedder(blocks).projected_score
        logits = q @ d.T
        expected = -sum(logits[i].log_softmax(-1)[i] for i in range(3)) / 3
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-5)
    with pytest.raises(ValueError, match="one block per query"):
        model(query_input_ids=queries, block_input_ids=blocks[:2])


def test_index_of_another_embedder_dimension_is_refused():
    import datasets

    from hf_realm import RealmBlockIndex

    model = RealmForMaskedLM(config())
    corpus = datasets.Dataset.from_dict({"input_ids": BLOCKS})
    model.index = RealmBlockIndex(corpus, torch.randn(len(BLOCKS), 8), backend="torch")
    input_ids, attention_mask, labels = batch()
    with pytest.raises(ValueError, match="query dim 16 != index dim 8"):
        model(input_ids, attention_mask=attention_mask, labels=labels)


def test_reader_mlm_loss_equals_float64_brute_force():
    """The reader warm start's loss: one given block per query, no retrieval, no null document."""
    torch.manual_seed(3)
    model = RealmForMaskedLM(config()).eval()
    model.index = ExactIndex(model.embedder)
    input_ids, attention_mask, labels = batch()
    blocks = [4, 7]
    with torch.no_grad():
        loss = model.reader_mlm_loss(input_ids, attention_mask, labels, torch.tensor(blocks)).item()
        model = model.double()
        terms = []
        for b, block_id in enumerate(blocks):
            x = input_ids[b][attention_mask[b].bool()].tolist()
            seq = torch.tensor(x + BLOCKS[block_id][1:])
            types = (torch.arange(len(seq)) >= len(x)).long()
            logits = model.encoder(seq[None, None], token_type_ids=types[None, None]).logits[0]
            for p in torch.nonzero(labels[b] != -100).flatten().tolist():
                terms.append(-logits[p].log_softmax(-1)[labels[b, p]].item())
    assert loss == pytest.approx(sum(terms) / len(terms), abs=1e-5)
    with pytest.raises(ValueError, match="one block per query"):
        model.reader_mlm_loss(input_ids, attention_mask, labels, torch.tensor([1]))


def test_reader_warm_start_teaches_the_reader_to_read_its_own_block(tmp_path):
    """`train_reader_warm_start` trains the knowledge-augmented encoder alone, and its own-block loss falls."""
    from hf_realm import (
        DataCollatorForSalientSpanMasking,
        KnowledgeWorld,
        RealmBlockIndex,
        build_corpus,
        build_pretraining_examples,
        train_reader_warm_start,
    )

    from .conftest import tiny_training_args

    world = KnowledgeWorld(num_entities=8, seed=0)
    tokenizer = world.tokenizer(model_max_length=64)
    corpus = build_corpus(world.corpus(), tokenizer, block_seq_len=64)
    torch.manual_seed(0)
    model = RealmForMaskedLM(tiny_realm_config(vocab_size=len(tokenizer), max_position_embeddings=64, **NO_DROPOUT))
    model.index = RealmBlockIndex.build(corpus, model.embedder, embed_kwargs={"show_progress": False})
    examples = build_pretraining_examples(corpus, None, tokenizer=tokenizer, max_length=32)
    batch = DataCollatorForSalientSpanMasking(tokenizer, max_length=32, seed=0)([examples[i] for i in range(16)])

    def own_block_loss():
        with torch.no_grad():
            return model.reader_mlm_loss(
                batch["input_ids"], batch["attention_mask"], batch["labels"], batch["source_block_id"]
            ).item()

    before = own_block_loss()
    retriever = {k: v.clone() for k, v in model.embedder.state_dict().items()}
    args = tiny_training_args(tmp_path, max_steps=60, learning_rate=3e-3, per_device_train_batch_size=16, seed=0)
    assert train_reader_warm_start(model, corpus, tokenizer, args, max_length=32).global_step == 60
    after = own_block_loss()
    assert after < 0.6 * before, (before, after)
    assert all(torch.equal(v, model.embedder.state_dict()[k]) for k, v in retriever.items())
    model.index = None
    with pytest.raises(ValueError, match="model's index"):
        train_reader_warm_start(model, corpus, tokenizer, args)


def test_grouped_order_keeps_groups_whole_in_every_pass():
    from hf_realm import grouped_order

    groups = [i % 5 for i in range(23)]  # five groups of 4-5 rows, interleaved
    order = grouped_order(groups, num_examples=50, seed=3)
    assert len(order) == 69  # whole passes: 3 x 23 >= 50
    for p in range(3):
        one_pass = order[23 * p : 23 * (p + 1)]
        assert sorted(one_pass) == list(range(23))
        keys = [groups[i] for i in one_pass]
        runs = [k for j, k in enumerate(keys) if j == 0 or keys[j - 1] != k]
        assert sorted(runs) == [0, 1, 2, 3, 4]  # each group is one contiguous run
    assert order[:23] != order[23:46]  # a fresh shuffle per pass
    assert grouped_order(groups, 50, seed=3) == order
    assert grouped_order(groups, 50, seed=4) != order
    with pytest.raises(ValueError, match="no rows"):
        grouped_order([], 1)


def test_grouped_ict_batches_hold_whole_documents(tmp_path):
    """With `group_by`, every ICT batch the model sees is the next cut of `grouped_order`: whole documents."""
    import datasets

    from hf_realm import grouped_order, train_inverse_cloze_task

    from .conftest import WORDS, tiny_training_args, toy_tokenizer

    tokenizer = toy_tokenizer()
    words = [w for w in WORDS if w.isalpha()][:12]
    rows = [{"doc_id": d, "title": words[d], "text": f"{words[d]} {words[j]} . {words[j + 1]} {words[d]} ."}
            for d in range(4) for j in range(d + 2)]  # fmt: skip
    corpus = datasets.Dataset.from_list(rows)
    torch.manual_seed(0)
    model = RealmForInverseClozeTask(config(vocab_size=len(tokenizer)))
    seen = []
    forward = model.forward

    def recording_forward(query_input_ids, block_input_ids, **kw):
        seen.append([tokenizer.decode(ids[1:2]) for ids in block_input_ids])  # the title after [CLS]
        return forward(query_input_ids=query_input_ids, block_input_ids=block_input_ids, **kw)

    model.forward = recording_forward
    args = tiny_training_args(tmp_path, max_steps=5, per_device_train_batch_size=4, seed=7)
    assert train_inverse_cloze_task(model, corpus, tokenizer, args, group_by="doc_id").global_step == 5
    order = grouped_order(corpus["doc_id"], 5 * 4, seed=7)
    assert seen == [[rows[i]["title"] for i in order[4 * s : 4 * s + 4]] for s in range(5)]
    for bad in ("article", None):
        args = tiny_training_args(tmp_path, max_steps=-1 if bad is None else 5, per_device_train_batch_size=4)
        with pytest.raises(ValueError, match="expected a corpus column, got 'article'" if bad else "max_steps > 0"):
            train_inverse_cloze_task(model, corpus, tokenizer, args, group_by=bad or "doc_id")
