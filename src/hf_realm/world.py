"""A generated knowledge world: the built-in default corpus, pretraining data and open-QA data of hf_realm.

Fictional people get random attributes (birthplace, birth year, occupation, employer, optionally residence). Each
person is a document of encyclopedia-style blocks that state the attributes; pretraining sentences restate one
attribute each (its value is the salient span to mask, its gold block is known); questions ask for one attribute.
Because the values are drawn at random, a model can predict a held-out value only by retrieving the block that
states it, which is exactly REALM's claim, and measurable: the closed-book chance level is ``1 / len(pool)``.

Facts (person, relation) are split into train / validation / test once; pretraining sentences and questions about
validation and test facts never appear in any training split, so evaluation is on facts the model could only have
read in the corpus.

Everything is deterministic by ``seed`` (string-seeded ``random.Random`` streams, no set iteration), and all names,
places and organisations are generated words that are distinct from each other and from every template word, so a
value never collides with a name or with the sentence frame.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import string
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from . import hub_io
from .masking import CAPITALIZED_STOPWORDS
from .world_templates import OCCUPATIONS, RELATIONS, TEMPLATE_SETS, Relation, TemplateSet


__all__ = ["OCCUPATIONS", "RELATIONS", "TEMPLATE_SETS", "KnowledgeWorld", "Relation", "TemplateSet", "WorldConfig"]

# What `save_tokenizer` and `save_to_disk` write: only such directories are replaced by a later save.
TOKENIZER_KIND = hub_io.DirectoryKind(
    "tokenizer",
    "tokenizer_config.json",
    frozenset(
        {
            "tokenizer_config.json",
            "tokenizer.json",
            "vocab.txt",
            "special_tokens_map.json",
            "added_tokens.json",
            "chat_template.jinja",
        }
    ),
    hint="tokenizer",
    manifest=False,
)
WORLD_KIND = hub_io.DirectoryKind(
    "KnowledgeWorld",
    "world_config.json",
    frozenset({"world_config.json", "corpus", "facts", "pretraining", "qa", "tokenizer"}),
    hint="world",
)


@dataclass
class WorldConfig:
    """Sizes and seed of a :class:`KnowledgeWorld`.

    Args:
        num_entities (`int`, *optional*, defaults to 1000): People (one document each).
        relations (`tuple[str]`, *optional*, defaults to `("birthplace", "birth_year", "occupation", "employer")`):
            Attributes per person, from :data:`RELATIONS` (``"residence"`` adds a second city slot).
        blocks_per_entity (`int`, *optional*, defaults to 1): Blocks per person; the relations are split among them,
            so each fact lives in exactly one block.
        num_first_names (`int`, *optional*, defaults to 150): Shared first names (surnames are unique per person).
        num_cities (`int`, *optional*, defaults to 120), num_organizations (`int`, *optional*, defaults to 150):
            Value pools.
        year_range (`tuple[int, int]`, *optional*, defaults to `(1650, 1949)`): Birth years, inclusive.
        num_occupations (`int`, *optional*): The first ``n`` of the 56 built-in occupations (all by default).
        sentences_per_fact (`int`, *optional*, defaults to 2): Pretraining sentences per training fact (distinct
            phrasings); validation and test facts get ``eval_sentences_per_fact`` (default 1).
        questions_per_fact (`int`, *optional*, defaults to 1): Questions per training fact; validation and test facts
            get ``eval_questions_per_fact`` (default 1).
        validation_fraction (`float`, *optional*, defaults to 0.05), test_fraction (`float`, *optional*, defaults to
            0.1): Fractions of (person, relation) facts held out.
        seed (`int`, *optional*, defaults to 0): Everything is a function of the config, seed included.
        templates (`str`, *optional*, defaults to `"biography"`): The world's language, a key of
            :data:`~hf_realm.world_templates.TEMPLATE_SETS`: ``"biography"`` (past-tense encyclopedia prose,
            ``Talor Vessik``) or ``"registry"`` (present-tense register entries with other phrasings and name shapes:
            hyphenated family names, two-word cities, ``Lodge of Umbrath``); a check that a recipe is not tuned to
            one set of sentences.
    """

    num_entities: int = 1000
    relations: tuple[str, ...] = ("birthplace", "birth_year", "occupation", "employer")
    blocks_per_entity: int = 1
    num_first_names: int = 150
    num_cities: int = 120
    num_organizations: int = 150
    year_range: tuple[int, int] = (1650, 1949)
    num_occupations: int | None = None
    sentences_per_fact: int = 2
    eval_sentences_per_fact: int = 1
    questions_per_fact: int = 1
    eval_questions_per_fact: int = 1
    validation_fraction: float = 0.05
    test_fraction: float = 0.1
    seed: int = 0
    templates: str = "biography"

    def __post_init__(self):
        self.relations = tuple(self.relations)
        self.year_range = tuple(self.year_range)
        if self.templates not in TEMPLATE_SETS:
            raise ValueError(f"templates must be one of {sorted(TEMPLATE_SETS)}, got {self.templates!r}")
        known = self.template_set.relations
        unknown = [r for r in self.relations if r not in known]
        if unknown or not self.relations:
            raise ValueError(f"relations must be a non-empty subset of {sorted(known)}, got {self.relations}")
        if len(set(self.relations)) != len(self.relations):
            raise ValueError(f"relations must not repeat, got {self.relations}")
        for name in ("num_entities", "num_first_names", "num_cities", "num_organizations", "blocks_per_entity"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("sentences_per_fact", "eval_sentences_per_fact", "questions_per_fact", "eval_questions_per_fact"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.blocks_per_entity > len(self.relations):
            raise ValueError(
                f"blocks_per_entity {self.blocks_per_entity} > number of relations {len(self.relations)}: "
                "every block must state at least one fact"
            )
        if len(self.year_range) != 2 or self.year_range[0] > self.year_range[1] or self.year_range[0] < 1000:
            raise ValueError(f"year_range must be (first, last) with 1000 <= first <= last, got {self.year_range}")
        if self.year_range[1] > 2099:
            raise ValueError(f"year_range must end by 2099 (four-digit years), got {self.year_range}")
        num_occupations = len(self.template_set.occupations)
        if self.num_occupations is not None and not 1 <= self.num_occupations <= num_occupations:
            raise ValueError(f"num_occupations must be in [1, {num_occupations}], got {self.num_occupations}")
        if not (
            0 <= self.validation_fraction < 1
            and 0 <= self.test_fraction < 1
            and self.validation_fraction + self.test_fraction < 1
        ):
            raise ValueError(
                "validation_fraction and test_fraction must be in [0, 1) with a sum < 1, got "
                f"{self.validation_fraction} and {self.test_fraction}"
            )

    @property
    def template_set(self) -> TemplateSet:
        return TEMPLATE_SETS[self.templates]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["relations"] = list(self.relations)
        d["year_range"] = list(self.year_range)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> WorldConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown WorldConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


@dataclass
class _Fact:
    fact_id: int
    entity_id: int
    relation: str
    value: str
    block_id: int = -1
    value_start: int = -1
    value_end: int = -1
    split: str = "train"


@dataclass
class _Entity:
    entity_id: int
    first: str
    last: str
    attributes: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _render(template: str, values: dict[str, str]) -> tuple[str, dict[str, tuple[int, int]]]:
    """Format ``template`` and return the character span of every field it filled."""
    pieces, spans, pos = [], {}, 0
    for literal, field_name, _, _ in string.Formatter().parse(template):
        pieces.append(literal)
        pos += len(literal)
        if field_name is not None:
            value = values[field_name]
            spans[field_name] = (pos, pos + len(value))
            pieces.append(value)
            pos += len(value)
    text = "".join(pieces)
    return text[0].upper() + text[1:], spans


def _template_words(template: str) -> list[str]:
    literal = "".join(lit for lit, _, _, _ in string.Formatter().parse(template))
    return [w.lower() for w in literal.replace("'", " ").split() if w.strip(string.punctuation)]


class KnowledgeWorld:
    r"""A deterministic generated world of fictional people: corpus, pretraining sentences, QA pairs, tokenizer.

    Args:
        config ([`WorldConfig`], *optional*): Sizes and seed; keyword arguments override its fields.
        **kwargs: Any [`WorldConfig`] field, e.g. ``num_entities=1000, seed=0``.

    Attributes:
        entities: ``list`` of people; ``entities[i].name``, ``entities[i].attributes[relation]``.
        pools: ``dict`` from pool name (``"city"``, ``"year"``, ``"occupation"``, ``"organization"``) to the list of
            possible values: closed-book chance for a relation is ``1 / len(pools[RELATIONS[r].pool])``.

    The datasets (`datasets.Dataset` / `datasets.DatasetDict`, built once and cached):

    - :meth:`corpus`: ``block_id``, ``doc_id`` (= entity id), ``title`` (the person's name), ``text``;
    - :meth:`facts`: ``fact_id``, ``entity_id``, ``name``, ``relation``, ``value``, ``block_id``, ``value_start``,
      ``value_end`` (the value's character span in the block text), ``split``;
    - :meth:`pretraining`: splits ``train``/``validation``/``test`` of ``text``, ``span_start``, ``span_end`` (the
      value's character span: the salient span to mask), ``value``, ``relation``, ``fact_id``, ``entity_id``,
      ``gold_block_id``;
    - :meth:`qa`: splits ``train``/``validation``/``test`` of ``question``, ``answers`` (list), ``relation``,
      ``fact_id``, ``entity_id``, ``gold_block_id``.

    Example:

    ```python
    >>> from hf_realm.world import KnowledgeWorld
    >>> world = KnowledgeWorld(num_entities=50, seed=0)
    >>> corpus = world.corpus()
    >>> len(corpus), world.pretraining()["train"].column_names[:3]
    (50, ['text', 'span_start', 'span_end'])
    >>> ex = world.qa()["test"][0]
    >>> ex["answers"][0] in corpus[ex["gold_block_id"]]["text"]
    True
    >>> tokenizer = world.tokenizer()
    >>> tokenizer.unk_token_id in tokenizer(corpus[0]["text"])["input_ids"]
    False
    ```
    """

    def __init__(self, config: WorldConfig | None = None, **kwargs):
        if config is None:
            config = WorldConfig(**kwargs)
        elif kwargs:
            config = WorldConfig.from_dict({**config.to_dict(), **kwargs})
        self.config = config
        self._cache: dict = {}
        self._generate()

    # -- generation ---------------------------------------------------------------------------------------------------

    def _rng(self, stream: str) -> random.Random:
        # str seeds go through sha512: independent of PYTHONHASHSEED and stable across Python versions
        return random.Random(f"hf_realm.world/{self.config.seed}/{stream}")

    def _reserved_words(self) -> set[str]:
        t = self.config.template_set
        reserved = {w.lower() for w in CAPITALIZED_STOPWORDS}
        reserved.update(t.occupations)
        reserved.update(s.lower() for s in t.organization_suffixes + t.city_suffixes)
        reserved.update(["a", "an", "the"])
        for template in t.all_templates() + [t.organization_format, t.city_format]:
            reserved.update(_template_words(template))
        return reserved

    def _generate_words(self, count: int, rng: random.Random, taken: set[str]) -> list[str]:
        t = self.config.template_set
        words = []
        attempts = 0
        while len(words) < count:
            attempts += 1
            if attempts > 100 * count + 10_000:
                raise RuntimeError(f"could not generate {count} distinct names (got {len(words)})")
            syllables = rng.choice(t.syllables)
            word = ""
            for i in range(syllables):
                onset = "" if i == 0 and rng.random() < 0.2 else rng.choice(t.onsets)
                coda = rng.choice(t.codas) if i == syllables - 1 else rng.choice(t.codas[:6])
                word += onset + rng.choice(t.vowels) + coda
            if not 4 <= len(word) <= 10 or word in taken:
                continue
            taken.add(word)
            words.append(word.capitalize())
        return words

    def _generate(self) -> None:
        c = self.config
        taken = self._reserved_words()
        rng = self._rng("names")
        # one shared stream of distinct words: no first name, surname, city or organisation stem collides
        t = c.template_set
        first_names = self._generate_words(c.num_first_names, rng, taken)
        if t.family_words == 1:
            surnames = self._generate_words(c.num_entities, rng, taken)
        else:
            surnames = self._family_names(rng, taken)
        cities = self._generate_words(c.num_cities, rng, taken)
        org_stems = self._generate_words(c.num_organizations, rng, taken)
        suffix_rng = self._rng("organizations")
        organizations = [
            t.organization_format.format(stem=stem, suffix=suffix_rng.choice(t.organization_suffixes))
            for stem in org_stems
        ]
        if t.city_format != "{stem}":
            city_rng = self._rng("cities")
            cities = [t.city_format.format(stem=stem, suffix=city_rng.choice(t.city_suffixes)) for stem in cities]
        occupations = list(t.occupations[: c.num_occupations] if c.num_occupations else t.occupations)
        years = [str(y) for y in range(c.year_range[0], c.year_range[1] + 1)]
        self.pools = {"city": cities, "year": years, "occupation": occupations, "organization": organizations}
        self.first_names = first_names

        rng = self._rng("attributes")
        self.entities = []
        for i in range(c.num_entities):
            entity = _Entity(i, rng.choice(first_names), surnames[i])
            for relation in c.relations:
                entity.attributes[relation] = rng.choice(self.pools[t.relations[relation].pool])
            self.entities.append(entity)

        self._facts = [
            _Fact(len(c.relations) * e.entity_id + j, e.entity_id, r, e.attributes[r])
            for e in self.entities
            for j, r in enumerate(c.relations)
        ]
        self._write_blocks()
        self._split_facts()

    def _family_names(self, rng: random.Random, taken: set[str]) -> list[str]:
        """Hyphenated family names of ``family_words`` generated words each, every word used by one person only."""
        n = self.config.template_set.family_words
        words = self._generate_words(n * self.config.num_entities, rng, taken)
        return ["-".join(words[i * n : (i + 1) * n]) for i in range(self.config.num_entities)]

    def _write_blocks(self) -> None:
        c = self.config
        t = c.template_set
        rng = self._rng("blocks")
        self._blocks: list[dict] = []
        facts_by_entity = {}
        for fact in self._facts:
            facts_by_entity.setdefault(fact.entity_id, {})[fact.relation] = fact
        for entity in self.entities:
            relations = list(c.relations)
            rng.shuffle(relations)
            groups = [
                sorted(relations[b :: c.blocks_per_entity], key=c.relations.index) for b in range(c.blocks_per_entity)
            ]
            for group in groups:
                block_id = len(self._blocks)
                sentences: list[tuple[list[str], str, dict[str, str]]] = []
                remaining = list(group)
                while remaining:
                    relation = remaining.pop(0)
                    partner = next(
                        (p for (r, p) in t.combined_block_templates if r == relation and p in remaining), None
                    )
                    if partner is not None and rng.random() < 0.5:
                        remaining.remove(partner)
                        template = rng.choice(t.combined_block_templates[(relation, partner)])
                        values = {relation: entity.attributes[relation], partner: entity.attributes[partner]}
                        values.update({f"a_{k}": _article(v) for k, v in values.items()})
                        sentences.append(([relation, partner], template, values))
                    else:
                        template = rng.choice(t.relations[relation].block_templates)
                        value = entity.attributes[relation]
                        sentences.append(([relation], template, {"value": value, "a": _article(value)}))
                text, pos = "", 0
                for k, (relations_here, template, values) in enumerate(sentences):
                    # the first sentence names the person in full, later ones by the short name or full name
                    short = entity.last if t.short_name == "last" else entity.first
                    values["name"] = entity.name if k == 0 or rng.random() < 0.5 else short
                    sentence, spans = _render(template, values)
                    if text:
                        text += " "
                        pos += 1
                    for relation in relations_here:
                        key = relation if relation in spans else "value"
                        fact = facts_by_entity[entity.entity_id][relation]
                        fact.block_id = block_id
                        fact.value_start, fact.value_end = pos + spans[key][0], pos + spans[key][1]
                    text += sentence
                    pos += len(sentence)
                self._blocks.append(
                    {"block_id": block_id, "doc_id": entity.entity_id, "title": entity.name, "text": text}
                )

    def _split_facts(self) -> None:
        c = self.config
        order = list(range(len(self._facts)))
        self._rng("splits").shuffle(order)
        n_test = round(c.test_fraction * len(order))
        n_val = round(c.validation_fraction * len(order))
        for rank, index in enumerate(order):
            self._facts[index].split = "test" if rank < n_test else "validation" if rank < n_test + n_val else "train"

    # -- datasets -----------------------------------------------------------------------------------------------------

    def corpus(self):
        """The knowledge corpus: one row per block (``block_id``, ``doc_id``, ``title``, ``text``)."""
        if "corpus" not in self._cache:
            import datasets

            self._cache["corpus"] = datasets.Dataset.from_list(
                self._blocks,
                features=datasets.Features(
                    {
                        "block_id": datasets.Value("int64"),
                        "doc_id": datasets.Value("int64"),
                        "title": datasets.Value("string"),
                        "text": datasets.Value("string"),
                    }
                ),
            )
        return self._cache["corpus"]

    def facts(self):
        """Every (person, relation) fact with its block, the value's character span there, and its split."""
        if "facts" not in self._cache:
            import datasets

            rows = [
                {
                    "fact_id": f.fact_id,
                    "entity_id": f.entity_id,
                    "name": self.entities[f.entity_id].name,
                    "relation": f.relation,
                    "value": f.value,
                    "block_id": f.block_id,
                    "value_start": f.value_start,
                    "value_end": f.value_end,
                    "split": f.split,
                }
                for f in self._facts
            ]
            self._cache["facts"] = datasets.Dataset.from_list(rows)
        return self._cache["facts"]

    def _examples(self, kind: str) -> dict[str, list[dict]]:
        c = self.config
        rng = self._rng(kind)
        out: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
        for fact in self._facts:
            relation = c.template_set.relations[fact.relation]
            entity = self.entities[fact.entity_id]
            if kind == "pretraining":
                templates = relation.sentence_templates
                count = c.sentences_per_fact if fact.split == "train" else c.eval_sentences_per_fact
            else:
                templates = relation.question_templates
                count = c.questions_per_fact if fact.split == "train" else c.eval_questions_per_fact
            chosen = rng.sample(templates, len(templates))
            for k in range(count):
                template = chosen[k % len(chosen)]
                values = {"name": entity.name, "value": fact.value, "a": _article(fact.value)}
                common = {
                    "relation": fact.relation,
                    "fact_id": fact.fact_id,
                    "entity_id": fact.entity_id,
                    "gold_block_id": fact.block_id,
                }
                if kind == "pretraining":
                    text, spans = _render(template, values)
                    start, end = spans["value"]
                    out[fact.split].append(
                        {"text": text, "span_start": start, "span_end": end, "value": fact.value, **common}
                    )
                else:
                    question, _ = _render(template, values)
                    out[fact.split].append({"question": question, "answers": [fact.value], **common})
        for split in out:
            rng.shuffle(out[split])
        return out

    def pretraining(self):
        """Masked-LM sentences, one fact each; ``span_start``/``span_end`` delimit the value (the span to mask)."""
        if "pretraining" not in self._cache:
            import datasets

            features = datasets.Features(
                {
                    "text": datasets.Value("string"),
                    "span_start": datasets.Value("int64"),
                    "span_end": datasets.Value("int64"),
                    "value": datasets.Value("string"),
                    "relation": datasets.Value("string"),
                    "fact_id": datasets.Value("int64"),
                    "entity_id": datasets.Value("int64"),
                    "gold_block_id": datasets.Value("int64"),
                }
            )
            examples = self._examples("pretraining")
            self._cache["pretraining"] = datasets.DatasetDict(
                {split: datasets.Dataset.from_list(rows, features=features) for split, rows in examples.items()}
            )
        return self._cache["pretraining"]

    def qa(self):
        """Open-QA pairs: ``question``, ``answers`` (list of strings), ``gold_block_id``, ``relation``, ..."""
        if "qa" not in self._cache:
            import datasets

            features = datasets.Features(
                {
                    "question": datasets.Value("string"),
                    "answers": datasets.Sequence(datasets.Value("string")),
                    "relation": datasets.Value("string"),
                    "fact_id": datasets.Value("int64"),
                    "entity_id": datasets.Value("int64"),
                    "gold_block_id": datasets.Value("int64"),
                }
            )
            examples = self._examples("qa")
            self._cache["qa"] = datasets.DatasetDict(
                {split: datasets.Dataset.from_list(rows, features=features) for split, rows in examples.items()}
            )
        return self._cache["qa"]

    # -- tokenizer ----------------------------------------------------------------------------------------------------

    def vocab(self) -> list[str]:
        """WordPiece vocabulary covering the world: special tokens, single characters, every word the world can
        write (names, values, template words) as a whole token, and ``##`` continuation characters (so words from
        outside the world still tokenize without ``[UNK]``)."""
        if "vocab" not in self._cache:
            from tokenizers import normalizers, pre_tokenizers

            normalizer = normalizers.BertNormalizer(lowercase=True)
            pre_tokenizer = pre_tokenizers.BertPreTokenizer()
            texts = [e.name for e in self.entities] + self.first_names
            for pool in self.pools.values():
                texts.extend(pool)
            t = self.config.template_set
            texts.extend(t.organization_suffixes + t.city_suffixes)
            texts.extend(t.all_templates())
            texts.extend(["a", "an"])
            words = set()
            for text in texts:
                for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
                    if not (word.startswith("{") or word.endswith("}")):
                        words.add(word)
            words -= {"{", "}"}
            chars = list(string.ascii_lowercase + string.digits + string.punctuation)
            specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
            vocab = (
                specials
                + chars
                + sorted(words - set(chars))
                + [f"##{ch}" for ch in string.ascii_lowercase + string.digits]
            )
            self._cache["vocab"] = vocab
        return list(self._cache["vocab"])

    def tokenizer(self, model_max_length: int = 512):
        """A `transformers` ``BertTokenizer`` (tokenizers-backed, lower-casing) over :meth:`vocab`."""
        from transformers import BertTokenizer

        vocab = OrderedDict((token, i) for i, token in enumerate(self.vocab()))
        return BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=model_max_length)

    def save_tokenizer(self, path: str | os.PathLike, model_max_length: int = 512) -> str:
        """Save the tokenizer (``tokenizer.json``, ``tokenizer_config.json`` and a BERT ``vocab.txt``) so that
        ``AutoTokenizer.from_pretrained(path)`` loads it offline. ``path`` must be new, empty or an earlier tokenizer
        save; it is replaced crash-safely (`hf_realm.hub_io`). Returns the path."""
        hub_io.save_directory(path, TOKENIZER_KIND, lambda tmp: self._write_tokenizer(tmp, model_max_length))
        return str(path)

    def _write_tokenizer(self, directory: Path, model_max_length: int) -> None:
        self.tokenizer(model_max_length).save_pretrained(directory)
        (Path(directory) / "vocab.txt").write_text("\n".join(self.vocab()) + "\n", encoding="utf-8")

    # -- persistence --------------------------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """SHA-256 of the corpus, facts, pretraining and QA contents: equal for equal worlds."""
        h = hashlib.sha256()
        payload = {
            "blocks": self._blocks,
            "facts": [asdict(f) for f in self._facts],
            "pretraining": self._examples("pretraining"),
            "qa": self._examples("qa"),
        }
        h.update(json.dumps(payload, sort_keys=True).encode())
        return h.hexdigest()

    def save_to_disk(self, path: str | os.PathLike) -> str:
        """Write ``world_config.json`` (config, fingerprint, size and SHA-256 of every file), ``corpus/``, ``facts/``,
        ``pretraining/``, ``qa/`` (``datasets`` ``save_to_disk`` format) and ``tokenizer/``. ``path`` must be new, empty
        or an earlier world save; the directory is written aside and swapped in crash-safely (`hf_realm.hub_io`), so
        an interrupted save leaves any previous one intact."""

        def write(tmp: Path) -> dict:
            self.corpus().save_to_disk(str(tmp / "corpus"))
            self.facts().save_to_disk(str(tmp / "facts"))
            self.pretraining().save_to_disk(str(tmp / "pretraining"))
            self.qa().save_to_disk(str(tmp / "qa"))
            self._write_tokenizer(tmp / "tokenizer", 512)
            return {"config": self.config.to_dict(), "fingerprint": self.fingerprint(), "format": 1}

        hub_io.save_directory(path, WORLD_KIND, write)
        return str(path)

    @classmethod
    def from_saved(cls, path: str | os.PathLike) -> KnowledgeWorld:
        """Regenerate the world saved at ``path`` from its config and check that the fingerprint matches (it will not
        if the generator changed since the save; load the saved datasets with ``datasets.load_from_disk`` then)."""
        path = Path(path)
        hub_io.recover(path, WORLD_KIND)
        if not (path / WORLD_KIND.marker).is_file():
            raise FileNotFoundError(f"{path} is not a saved world: no {WORLD_KIND.marker} in it")
        meta = hub_io.read_config(path, WORLD_KIND, {"config": dict, "fingerprint": str})
        world = cls(WorldConfig.from_dict(meta["config"]))
        if world.fingerprint() != meta["fingerprint"]:
            raise ValueError(
                f"world at {path} has fingerprint {meta['fingerprint'][:12]} but its config now generates "
                f"{world.fingerprint()[:12]}: the generator changed; use datasets.load_from_disk on its sub-directories"
            )
        return world

    def write_pretraining_files(self, directory: str | os.PathLike) -> dict[str, str]:
        """Write the world as a user's own data would look: ``corpus.jsonl`` (``block_id``, ``doc_id``, ``title``,
        ``text``), ``train.jsonl`` (training sentences: ``text``, ``span``, the exact value to mask, and
        ``gold_block_id``) and ``validation.jsonl`` (the held-out test facts, same columns), for
        ``examples/train_realm.py --corpus_file ... --train_file ... --validation_file ...``. Existing files are
        never overwritten (`FileExistsError`). Returns the paths by name."""
        directory = Path(directory)
        paths = {name: directory / f"{name}.jsonl" for name in ("corpus", "train", "validation")}
        existing = [str(p) for p in paths.values() if p.exists()]
        if existing:
            raise FileExistsError(f"not overwriting {existing}")
        rows = {"corpus": self._blocks}
        for name, split in (("train", "train"), ("validation", "test")):
            rows[name] = []
            for r in self.pretraining()[split]:
                if r["text"].find(r["value"]) != r["span_start"]:  # `span` masks its first occurrence
                    raise RuntimeError(f"the value {r['value']!r} occurs earlier in {r['text']!r}")
                rows[name].append({"text": r["text"], "span": r["value"], "gold_block_id": r["gold_block_id"]})
        directory.mkdir(parents=True, exist_ok=True)
        for name, path in paths.items():
            with open(path, "x", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows[name])
        return {name: str(path) for name, path in paths.items()}

    def chance_accuracy(self, relation: str) -> float:
        """Closed-book chance of guessing ``relation``'s value uniformly from its pool."""
        return 1.0 / len(self.pools[self.config.template_set.relations[relation].pool])

    def __repr__(self) -> str:
        c = self.config
        return (
            f"KnowledgeWorld(num_entities={c.num_entities}, relations={list(c.relations)}, "
            f"blocks={len(self._blocks)}, facts={len(self._facts)}, seed={c.seed})"
        )
