"""Phrasings and name shapes of the generated knowledge worlds (:class:`~hf_realm.world.KnowledgeWorld`).

A :class:`TemplateSet` is everything about a world that is language rather than facts: how each relation is stated
in a block, restated in a pretraining sentence and asked in a question, which occupations exist, and how people,
cities and organisations are named. Two sets are built in, so that a recipe tuned on one can be checked on the
other: ``"biography"`` (the default: past-tense encyclopedia prose, ``Talor Vessik``, one-word cities,
``Drenmo Guild``) and ``"registry"`` (present-tense register entries with other verbs, hyphenated family names
referred to by the given name, two-word cities such as ``Korvel Ford`` and organisations such as
``Lodge of Umbrath``).
"""

from __future__ import annotations

from dataclasses import dataclass


__all__ = ["RELATIONS", "TEMPLATE_SETS", "Relation", "TemplateSet"]


@dataclass(frozen=True)
class Relation:
    """One attribute of a person, with the phrasings used to state and to ask it.

    Templates are `str.format` strings with the fields ``{name}``, ``{value}`` and ``{a}`` (the article, "a" or
    "an", for the value). Pretraining templates must not be ambiguous between relations once the value is masked
    (``"{name} was born in {value}."`` would be, birthplace or year).
    """

    name: str
    pool: str  # "city", "year", "occupation", "organization"
    block_templates: tuple[str, ...]
    sentence_templates: tuple[str, ...]
    question_templates: tuple[str, ...]


@dataclass(frozen=True)
class TemplateSet:
    """The language of a generated world: relation phrasings, occupations and name shapes.

    Args:
        name (`str`): The key in :data:`TEMPLATE_SETS` (``WorldConfig(templates=name)``).
        relations (`dict[str, Relation]`): Every relation a world may use, by name.
        combined_block_templates (`dict[tuple[str, str], tuple[str, ...]]`): Block sentences stating two facts at
            once (fields named after the relations, ``a_<relation>`` for articles).
        occupations (`tuple[str, ...]`): The occupation pool (lower case).
        organization_format (`str`), organization_suffixes (`tuple[str, ...]`): An organisation's name from a
            generated ``{stem}`` and a ``{suffix}`` drawn from the list.
        city_format (`str`), city_suffixes (`tuple[str, ...]`): The same for cities (``"{stem}"``: one word).
        family_words (`int`): Generated words in a family name, joined by hyphens (each word names one person only).
        short_name (`str`): ``"last"`` or ``"first"``, how a block refers to its person after the first sentence.
        onsets (`tuple[str, ...]`), vowels (`tuple[str, ...]`), codas (`tuple[str, ...]`), syllables
            (`tuple[int, ...]`): The syllable inventory of generated words (syllable counts drawn from
            ``syllables``).
    """

    name: str
    relations: dict[str, Relation]
    combined_block_templates: dict[tuple[str, str], tuple[str, ...]]
    occupations: tuple[str, ...]
    organization_format: str
    organization_suffixes: tuple[str, ...]
    city_format: str
    city_suffixes: tuple[str, ...]
    family_words: int
    short_name: str
    onsets: tuple[str, ...]
    vowels: tuple[str, ...]
    codas: tuple[str, ...]
    syllables: tuple[int, ...]

    def all_templates(self) -> list[str]:
        """Every template of the set (block, sentence, question and combined)."""
        out = []
        for relation in self.relations.values():
            out.extend(relation.block_templates + relation.sentence_templates + relation.question_templates)
        for templates in self.combined_block_templates.values():
            out.extend(templates)
        return out


RELATIONS: dict[str, Relation] = {
    r.name: r
    for r in (
        Relation(
            "birthplace",
            "city",
            (
                "{name} was born in {value}.",
                "{name} was a native of {value}.",
                "The birthplace of {name} was {value}.",
            ),
            (
                "{name} was born in the city of {value}.",
                "The birthplace of {name} was {value}.",
                "{name} was a native of {value}.",
            ),
            ("Where was {name} born?", "What was the birthplace of {name}?", "In which city was {name} born?"),
        ),
        Relation(
            "birth_year",
            "year",
            ("{name} was born in {value}.", "{name} was born in the year {value}."),
            (
                "{name} was born in the year {value}.",
                "The birth year of {name} was {value}.",
                "{name}'s year of birth was {value}.",
            ),
            ("When was {name} born?", "In what year was {name} born?", "What was the birth year of {name}?"),
        ),
        Relation(
            "occupation",
            "occupation",
            (
                "{name} worked as {a} {value}.",
                "{name} was {a} {value} by profession.",
                "By profession, {name} was {a} {value}.",
            ),
            (
                "The occupation of {name} was {value}.",
                "{name} was known as a skilled {value}.",
                "{name} earned a living as a trained {value}.",
            ),
            ("What was the occupation of {name}?", "What did {name} work as?", "What was {name}'s profession?"),
        ),
        Relation(
            "employer",
            "organization",
            ("{name} was employed by the {value}.", "{name} worked for the {value}.", "The {value} employed {name}."),
            (
                "The employer of {name} was the {value}.",
                "{name} was on the staff of the {value}.",
                "{name} held a post at the {value}.",
            ),
            ("Who employed {name}?", "Which organization employed {name}?", "Where did {name} work?"),
        ),
        Relation(
            "residence",
            "city",
            ("{name} lived in {value}.", "{name} settled in {value}."),
            ("{name} spent later life in the city of {value}.", "In later life, {name} made a home in {value}."),
            ("Where did {name} live?", "In which city did {name} settle?"),
        ),
    )
}

OCCUPATIONS = tuple(
    """
    apothecary architect astronomer baker banker blacksmith botanist brewer carpenter cartographer chemist
    clockmaker composer cooper diplomat economist engineer engraver farrier fisherman gardener geologist glassblower
    historian jeweller journalist judge lawyer librarian locksmith mason mathematician merchant miller navigator
    novelist organist painter philosopher photographer physician physicist poet potter printer saddler sculptor
    shipwright surgeon surveyor tailor tanner translator violinist weaver zoologist
    """.split()
)

BIOGRAPHY = TemplateSet(
    name="biography",
    relations=RELATIONS,
    combined_block_templates={
        ("birthplace", "birth_year"): ("{name} was born in {birthplace} in {birth_year}.",),
        ("occupation", "employer"): ("{name} worked as {a_occupation} {occupation} at the {employer}.",),
    },
    occupations=OCCUPATIONS,
    organization_format="{stem} {suffix}",
    organization_suffixes=tuple(
        "Academy Bank Company Foundry Guild Institute Library Museum Observatory Press Society Works".split()
    ),
    city_format="{stem}",
    city_suffixes=(),
    family_words=1,
    short_name="last",
    onsets=tuple("b br c d dr f g gr h j k kr l m n p pr r s sh st t th tr v z".split()),
    vowels=tuple("a e i o u ai ea ie ou y".split()),
    codas=("", "", "", "n", "r", "l", "s", "k", "m", "th", "nd", "rn", "x"),
    syllables=(2, 2, 2, 3),
)

REGISTRY = TemplateSet(
    name="registry",
    relations={
        r.name: r
        for r in (
            Relation(
                "birthplace",
                "city",
                ("{name} hails from {value}.", "{value} is the hometown of {name}.", "{name} comes from {value}."),
                (
                    "The hometown of {name} is {value}.",
                    "{name} grew up as a child of {value}.",
                    "Records give {value} as the hometown of {name}.",
                ),
                ("What is the hometown of {name}?", "Which town does {name} come from?"),
            ),
            Relation(
                "birth_year",
                "year",
                ("{name} first saw daylight in {value}.", "The year {value} marks the arrival of {name}."),
                (
                    "{name} came into this world during {value}.",
                    "The natal year of {name} is {value}.",
                    "Records date the arrival of {name} to {value}.",
                ),
                ("Which year saw the arrival of {name}?", "What is the natal year of {name}?"),
            ),
            Relation(
                "occupation",
                "occupation",
                (
                    "{name} practises the craft of {value}.",
                    "By trade, {name} is {a} {value}.",
                    "{name} earns wages as {a} {value}.",
                ),
                (
                    "{name} follows the trade of {value}.",
                    "The craft of {name} is that of {a} {value}.",
                    "Ask around and {name} is known as {a} {value}.",
                ),
                ("What trade does {name} follow?", "What is the craft of {name}?"),
            ),
            Relation(
                "employer",
                "organization",
                (
                    "{name} serves the {value}.",
                    "The {value} pays the wages of {name}.",
                    "{name} answers to the {value}.",
                ),
                (
                    "{name} draws a salary from the {value}.",
                    "The paymaster of {name} is the {value}.",
                    "{name} reports to the {value}.",
                ),
                ("Whom does {name} serve?", "Who pays the wages of {name}?"),
            ),
            Relation(
                "residence",
                "city",
                ("{name} dwells in {value}.", "{name} keeps a house in {value}."),
                ("The current dwelling of {name} is in {value}.", "{name} resides within the walls of {value}."),
                ("Where does {name} dwell?", "Where does {name} keep a house?"),
            ),
        )
    },
    combined_block_templates={
        ("birthplace", "birth_year"): ("{name} hails from {birthplace} and first saw daylight in {birth_year}.",),
        ("occupation", "employer"): ("{name} serves the {employer} as {a_occupation} {occupation}.",),
    },
    occupations=tuple(
        """
        alchemist archivist armourer bellfounder bookbinder candlemaker chandler cobbler coppersmith courier dyer
        falconer fletcher furrier glazier goldsmith herbalist innkeeper lamplighter lutemaker midwife minstrel
        netmaker ropemaker scribe shepherd silversmith soapmaker spinner stonecutter swordsmith tinker thatcher
        toymaker vintner wainwright wheelwright woodcarver
        """.split()
    ),
    organization_format="{suffix} of {stem}",
    organization_suffixes=tuple(
        "Brotherhood Chapter Circle College Compact Council Fellowship Hall League Lodge Order Union".split()
    ),
    city_format="{stem} {suffix}",
    city_suffixes=tuple("Ford Haven Cross Reach Hollow Mere Vale Watch".split()),
    family_words=2,
    short_name="first",
    onsets=tuple("k kh l ll m n q r rh s t ts v w x y z zh".split()),
    vowels=tuple("a aa e ei i o oo u".split()),
    codas=("", "", "", "k", "l", "n", "r", "sh", "t", "v"),
    syllables=(2, 2, 3),
)

TEMPLATE_SETS: dict[str, TemplateSet] = {t.name: t for t in (BIOGRAPHY, REGISTRY)}
