import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from hf_realm.world import OCCUPATIONS, RELATIONS, KnowledgeWorld, WorldConfig

from .conftest import subprocess_env


@pytest.fixture(scope="module")
def world():
    return KnowledgeWorld(num_entities=300, seed=7)


def test_deterministic_by_seed_and_independent_of_hash_seed():
    a, b = KnowledgeWorld(num_entities=120, seed=5), KnowledgeWorld(num_entities=120, seed=5)
    assert a.fingerprint() == b.fingerprint()
    assert a.corpus().to_list() == b.corpus().to_list()
    assert a.qa()["test"].to_list() == b.qa()["test"].to_list()
    assert a.vocab() == b.vocab()
    c = KnowledgeWorld(num_entities=120, seed=6)
    assert c.fingerprint() != a.fingerprint()
    assert [e.name for e in c.entities] != [e.name for e in a.entities]
    code = "from hf_realm.world import KnowledgeWorld; print(KnowledgeWorld(num_entities=120, seed=5).fingerprint())"
    for hash_seed in ("987",):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=subprocess_env(PYTHONHASHSEED=hash_seed),
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.strip() == a.fingerprint()


def test_sizes_and_splits(world):
    c = world.config
    n_facts = 300 * 4
    facts = world.facts()
    assert len(world.corpus()) == 300 and len(facts) == n_facts
    counts = Counter(facts["split"])
    assert counts == {"test": 120, "validation": 60, "train": 1020}  # round(0.1 * 1200), round(0.05 * 1200)
    pre, qa = world.pretraining(), world.qa()
    assert (len(pre["train"]), len(pre["validation"]), len(pre["test"])) == (1020 * c.sentences_per_fact, 60, 120)
    assert (len(qa["train"]), len(qa["validation"]), len(qa["test"])) == (1020, 60, 120)
    split_of = dict(zip(facts["fact_id"], facts["split"], strict=True))
    for split in ("train", "validation", "test"):
        assert {split_of[f] for f in pre[split]["fact_id"]} == {split}
        assert {split_of[f] for f in qa[split]["fact_id"]} == {split}
    # held-out facts are never asked or stated in training
    train_facts = set(pre["train"]["fact_id"]) | set(qa["train"]["fact_id"])
    assert not train_facts & (set(qa["test"]["fact_id"]) | set(qa["validation"]["fact_id"]))


def test_every_fact_in_its_block_slot_and_answers_in_gold_block(world):
    corpus = world.corpus()
    texts = list(corpus["text"])
    facts = world.facts()
    for f in facts:
        assert texts[f["block_id"]][f["value_start"] : f["value_end"]] == f["value"]
        assert world.entities[f["entity_id"]].attributes[f["relation"]] == f["value"]
        assert corpus[f["block_id"]]["doc_id"] == f["entity_id"]
    fact = {f["fact_id"]: f for f in facts}
    for split in ("train", "validation", "test"):
        for ex in world.qa()[split]:
            f = fact[ex["fact_id"]]
            assert ex["answers"] == [f["value"]] and ex["gold_block_id"] == f["block_id"]
            assert f["value"] in texts[ex["gold_block_id"]]
            assert world.entities[ex["entity_id"]].name in ex["question"]
        for ex in world.pretraining()[split]:
            f = fact[ex["fact_id"]]
            assert ex["text"][ex["span_start"] : ex["span_end"]] == ex["value"] == f["value"]
            assert ex["gold_block_id"] == f["block_id"]


def test_multi_block_entities_state_each_fact_once():
    world = KnowledgeWorld(num_entities=150, seed=2, blocks_per_entity=2)
    corpus, facts = world.corpus(), world.facts()
    assert len(corpus) == 300
    blocks_of = {}
    for b in corpus:
        blocks_of.setdefault(b["doc_id"], []).append(b)
    for f in facts:
        same_entity = blocks_of[f["entity_id"]]
        assert len(same_entity) == 2
        for block in same_entity:
            if block["block_id"] == f["block_id"]:
                assert block["text"][f["value_start"] : f["value_end"]] == f["value"]
            else:  # the other block of the same person has no slot for this relation and never states the value
                assert f["value"] not in block["text"]
    per_block = Counter(facts["block_id"])
    assert sorted(set(per_block.values())) == [2]  # 4 relations over 2 blocks
    for ex in world.qa()["test"]:
        assert ex["answers"][0] in corpus[ex["gold_block_id"]]["text"]


def test_names_distinct_and_disjoint_from_values_and_templates(world):
    surnames = [e.last for e in world.entities]
    names = [e.name for e in world.entities]
    assert len(set(surnames)) == len(surnames) and len(set(names)) == len(names)
    first = set(world.first_names)
    cities = set(world.pools["city"])
    stems = {o.split()[0] for o in world.pools["organization"]}
    assert len(stems) == len(world.pools["organization"])
    pools = [first, set(surnames), cities, stems]
    for i in range(len(pools)):
        for j in range(i + 1, len(pools)):
            assert not {w.lower() for w in pools[i]} & {w.lower() for w in pools[j]}
    template_words = set()
    for r in RELATIONS.values():
        for t in r.block_templates + r.sentence_templates + r.question_templates:
            template_words.update(w.strip(".,?'").lower() for w in t.replace("'s", "").split())
    generated = {w.lower() for pool in pools for w in pool}
    assert not generated & template_words
    assert not generated & set(world.pools["occupation"])


def test_multiple_phrasings(world):
    for split, column in (("train", "text"), ("train", "question")):
        data = world.pretraining()[split] if column == "text" else world.qa()[split]
        frames = {}
        for ex in data:
            frame = ex[column].replace(world.entities[ex["entity_id"]].name, "{name}")
            if column == "text":
                frame = frame.replace(ex["value"], "{value}")
            frames.setdefault(ex["relation"], set()).add(frame)
        for relation in world.config.relations:
            templates = (
                RELATIONS[relation].sentence_templates if column == "text" else RELATIONS[relation].question_templates
            )
            assert frames[relation] == {t[0].upper() + t[1:] for t in templates}
    # two distinct phrasings per training fact
    by_fact = {}
    for ex in world.pretraining()["train"]:
        by_fact.setdefault(ex["fact_id"], []).append(ex["text"])
    assert all(len(set(v)) == 2 for v in by_fact.values())


def test_tokenizer_covers_the_world_and_loads_offline(world, tmp_path):
    from transformers import AutoTokenizer

    path = world.save_tokenizer(tmp_path / "tok")
    assert (tmp_path / "tok" / "vocab.txt").read_text().splitlines() == world.vocab()
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.get_vocab() == {t: i for i, t in enumerate(world.vocab())}
    assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id] == [
        0,
        1,
        2,
        3,
        4,
    ]
    texts = (
        list(world.corpus()["text"])
        + list(world.qa()["test"]["question"])
        + list(world.pretraining()["train"]["text"])
    )
    for ids in tok(texts)["input_ids"]:
        assert tok.unk_token_id not in ids
    for e in world.entities[:50]:
        assert len(tok.tokenize(e.name)) == 2  # first name and surname are whole words
    for value in world.pools["year"] + world.pools["city"] + world.pools["occupation"]:
        assert len(tok.tokenize(value)) == 1
    for org in world.pools["organization"]:
        assert len(tok.tokenize(org)) == 2
    # words from outside the world fall back to characters, not [UNK]
    assert tok.tokenize("zebra 2024") == ["z", "##e", "##b", "##r", "##a", "2", "##0", "##2", "##4"]
    # the default world's vocabulary is small enough for a tiny BERT
    assert 1900 <= len(KnowledgeWorld().vocab()) <= 2500


def test_save_to_disk_roundtrip_and_fingerprint_check(tmp_path):
    import datasets

    world = KnowledgeWorld(num_entities=40, seed=11, blocks_per_entity=2)
    path = tmp_path / "world"
    world.save_to_disk(path)
    world.save_to_disk(path)  # replacing an existing save works
    assert sorted(os.listdir(path)) == ["corpus", "facts", "pretraining", "qa", "tokenizer", "world_config.json"]
    assert datasets.load_from_disk(str(path / "corpus")).to_list() == world.corpus().to_list()
    assert datasets.load_from_disk(str(path / "qa"))["test"].to_list() == world.qa()["test"].to_list()
    again = KnowledgeWorld.from_saved(path)
    assert again.config == world.config and again.fingerprint() == world.fingerprint()
    meta = json.loads((path / "world_config.json").read_text())
    meta["fingerprint"] = "0" * 64
    (path / "world_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="generator changed"):
        KnowledgeWorld.from_saved(path)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp dirs left behind


def test_config_validation_and_overrides():
    with pytest.raises(ValueError, match="relations must be a non-empty subset"):
        WorldConfig(relations=("birthplace", "height"))
    with pytest.raises(ValueError, match="blocks_per_entity 5 > number of relations 4"):
        WorldConfig(blocks_per_entity=5)
    with pytest.raises(ValueError, match="sum < 1"):
        WorldConfig(validation_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="unknown WorldConfig keys"):
        WorldConfig.from_dict({"num_people": 3})
    w = KnowledgeWorld(WorldConfig(num_entities=10), seed=4, relations=("residence", "birthplace"))
    assert w.config.seed == 4 and w.config.relations == ("residence", "birthplace")
    assert len(w.facts()) == 20
    assert w.chance_accuracy("birth_year") == 1 / 300 and w.chance_accuracy("residence") == 1 / 120
    assert WorldConfig.from_dict(w.config.to_dict()) == w.config


def test_attribute_values_spread_over_their_pools():
    world = KnowledgeWorld(num_entities=2000, seed=0)
    years = Counter(e.attributes["birth_year"] for e in world.entities)
    occupations = Counter(e.attributes["occupation"] for e in world.entities)
    # uniform draws: 2000 over 300 years and 56 occupations; no value dominates (closed book stays near chance)
    assert len(occupations) == len(OCCUPATIONS) == 56 and max(occupations.values()) / 2000 < 0.04
    assert len(years) > 280 and max(years.values()) / 2000 < 0.02


def test_registry_world_other_phrasings_and_name_shapes():
    """The second template set: its own phrasings, hyphenated family names whose words name one person each, the given
    name as the short mention, two-word cities, `<Suffix> of <Stem>` organisations; facts still in their gold block."""
    from hf_realm.world import TEMPLATE_SETS

    world = KnowledgeWorld(num_entities=200, seed=7, templates="registry")
    registry, biography = TEMPLATE_SETS["registry"], TEMPLATE_SETS["biography"]
    assert not set(registry.all_templates()) & set(biography.all_templates())
    family = [e.last.split("-") for e in world.entities]
    assert all(len(parts) == 2 for parts in family)
    words = [w for parts in family for w in parts]
    assert len(set(words)) == len(words) == 400
    assert all(len(c.split()) == 2 and c.split()[1] in registry.city_suffixes for c in world.pools["city"])
    assert all(
        o.split()[1] == "of" and o.split()[0] in registry.organization_suffixes for o in world.pools["organization"]
    )
    assert set(world.pools["occupation"]) == set(registry.occupations) and not set(registry.occupations) & set(
        OCCUPATIONS
    )
    texts = list(world.corpus()["text"])
    for fact in world.facts():
        assert texts[fact["block_id"]][fact["value_start"] : fact["value_end"]] == fact["value"]
    later = [t for t, e in zip(texts, world.entities, strict=True) if f". {e.first} " in t]
    assert later  # some later sentences name the person by the given name alone
    frames = set()
    for ex in world.pretraining()["train"]:
        frame = ex["text"].replace(world.entities[ex["entity_id"]].name, "{name}").replace(ex["value"], "{value}")
        frames.add(frame.replace(" an {value}", " {a} {value}").replace(" a {value}", " {a} {value}"))
    templates = [t for r in world.config.relations for t in registry.relations[r].sentence_templates]
    assert frames == {t[0].upper() + t[1:] for t in templates}
    assert world.fingerprint() != KnowledgeWorld(num_entities=200, seed=7).fingerprint()
    tokenizer = world.tokenizer()
    assert tokenizer.unk_token_id not in tokenizer(texts[:20])["input_ids"][0]
    with pytest.raises(ValueError, match="templates must be one of"):
        WorldConfig(templates="sonnets")
