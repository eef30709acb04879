"""The toy vocabulary and corpus shared by the REALM model and open-QA tests."""

from hf_realm import RealmTokenizer


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
