"""CrossFacts: a generated benchmark where the publisher's answer sits in another party's document.

The paper evaluates FedAttn on tasks where every party could answer alone; CrossFacts measures
collaboration itself. Each non-publisher party holds one short record (a register of people with
an ID code, an amount, a date and a city each); the publisher holds only a question about one fact
of one person. People with similar names (the same surname, or a first name or surname one or two
letters apart) carry different facts, in the same or another document, so a reader that retrieves
approximately gets it wrong.

Everything is a pure function of the seed: item ``i`` is drawn from its own ``random.Random``
seeded with ``(seed, i)``, so a subset (offset/limit) is the same items whatever ``count`` is.
The gold string occurs exactly once across all documents (so in exactly one party's document) and
never in the question; a draw that breaks this is re-drawn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from fedattn.errors import FedAttnError

FIELDS = ("code", "amount", "date", "city")

# pairs that differ by a letter or two: the distractors' raw material
FIRST_NAME_PAIRS = (
    ("Marta", "Marek"),
    ("Anna", "Hanna"),
    ("Jan", "Jana"),
    ("Ewa", "Eva"),
    ("Lena", "Lina"),
    ("Karol", "Karla"),
    ("Piotr", "Petra"),
    ("Olga", "Olaf"),
    ("Igor", "Inga"),
    ("Nina", "Nika"),
    ("Tomas", "Tomasz"),
    ("Daria", "Dario"),
    ("Emil", "Emilia"),
    ("Lars", "Lara"),
    ("Rosa", "Rosita"),
)
SURNAME_PAIRS = (
    ("Nowak", "Novak"),
    ("Lind", "Linde"),
    ("Berg", "Borg"),
    ("Hansen", "Jansen"),
    ("Meyer", "Mayer"),
    ("Schmidt", "Schmitt"),
    ("Larsen", "Larson"),
    ("Moreau", "Moreno"),
    ("Silva", "Sylva"),
    ("Weber", "Webber"),
    ("Fischer", "Fisher"),
    ("Brandt", "Brant"),
    ("Kowalski", "Kowalsky"),
    ("Petrov", "Petrova"),
    ("Holm", "Holt"),
)
FIRST_NAMES = tuple(name for pair in FIRST_NAME_PAIRS for name in pair)
SURNAMES = tuple(name for pair in SURNAME_PAIRS for name in pair)
CITIES = (
    "Gdansk",
    "Krakow",
    "Poznan",
    "Lodz",
    "Lublin",
    "Bergen",
    "Malmo",
    "Aarhus",
    "Tampere",
    "Tartu",
    "Riga",
    "Vilnius",
    "Porto",
    "Lyon",
    "Graz",
    "Brno",
    "Ghent",
    "Leiden",
    "Bremen",
    "Basel",
    "Turin",
    "Seville",
    "Cork",
    "Split",
    "Kosice",
    "Szeged",
    "Iasi",
    "Varna",
    "Bilbao",
    "Nantes",
)
CODE_LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"
DOCUMENT_KINDS = (
    "Personnel register (private to the HR office)",
    "Customer ledger (private to the accounts team)",
    "Shipping log (private to the warehouse)",
    "Membership list (private to the club secretary)",
    "Patient intake sheet (private to the clinic)",
)
QUESTIONS = {
    "code": "What is {name}'s ID code? Answer with the code only.",
    "amount": "What amount in euros is recorded for {name}? Answer with the number only.",
    "date": "What date is recorded for {name}? Answer with the date only, as YYYY-MM-DD.",
    "city": "Which city is recorded for {name}? Answer with the city name only.",
}
MAX_DRAWS = 1000  # re-draws per item before giving up (only absurd sizes get near this)


@dataclass(frozen=True)
class Person:
    name: str
    code: str
    amount: str
    date: str
    city: str

    def line(self) -> str:
        return f"- {self.name}: ID code {self.code}, amount {self.amount} euros, date {self.date}, city {self.city}."


@dataclass(frozen=True)
class Item:
    """One question. ``documents[k]`` belongs to party k + 1; the publisher is party len(documents) + 1."""

    documents: tuple[str, ...]
    question: str
    answer: str
    holder: int  # index into documents of the one that holds the answer
    field: str
    person: str
    distractors: tuple[str, ...]  # names similar to ``person`` that appear in some document
    references: tuple[str, ...] = ()  # every accepted answer when there are several (NarrativeQA); else just ``answer``

    @property
    def golds(self) -> tuple[str, ...]:
        """The reference answers scored against: ``references`` if given, else ``(answer,)``."""
        return self.references or (self.answer,)

    @property
    def holder_party(self) -> int:
        """The holder's party number (1-based, as in the engine's 'party-N')."""
        return self.holder + 1


def generate(seed: int, count: int, parties: int = 3, facts_per_party: int = 4) -> list[Item]:
    """``count`` items for ``parties`` parties (the publisher included), ``facts_per_party`` people per document."""
    check_sizes(count, parties, facts_per_party)
    return [generate_item(seed, index, parties, facts_per_party) for index in range(count)]


def check_sizes(count: int, parties: int, facts_per_party: int) -> None:
    if count < 0:
        raise FedAttnError(f"the item count must be >= 0, got {count}")
    if parties < 2:
        raise FedAttnError(f"CrossFacts needs at least 2 parties (a collaborator and the publisher), got {parties}")
    if facts_per_party < 1:
        raise FedAttnError(f"each party needs at least 1 fact, got {facts_per_party}")
    people = (parties - 1) * facts_per_party
    if people < 2:
        raise FedAttnError("CrossFacts needs room for at least 2 people (the asked one and a distractor)")
    if people > len(FIRST_NAMES) * len(SURNAMES) // 2:
        raise FedAttnError(f"{people} people per item is more than the name pool supports")


def generate_item(seed: int, index: int, parties: int, facts_per_party: int) -> Item:
    """Item ``index`` of ``seed``; draws until the gold answer occurs exactly once in all documents."""
    rng = random.Random(f"crossfacts:{seed}:{index}")
    for _ in range(MAX_DRAWS):
        item = _draw(rng, parties - 1, facts_per_party)
        if _answer_is_unique(item):
            return item
    raise FedAttnError(f"could not draw item {index} with a unique answer; use fewer parties or facts")


def _draw(rng: random.Random, documents: int, per_document: int) -> Item:
    names = _names(rng, documents * per_document)
    people = [_person(rng, name) for name in names]
    # the asked person is names[0] and its similar-named distractor names[1]; shuffle them into places
    slots = list(range(len(people)))
    rng.shuffle(slots)
    placed = [people[slot] for slot in slots]
    target_position = slots.index(0)
    holder = target_position // per_document
    kinds = rng.sample(DOCUMENT_KINDS, k=min(documents, len(DOCUMENT_KINDS)))
    texts = tuple(
        _document(kinds[k % len(kinds)], placed[k * per_document : (k + 1) * per_document]) for k in range(documents)
    )
    target = people[0]
    field = rng.choice(FIELDS)
    return Item(
        documents=texts,
        question=QUESTIONS[field].format(name=target.name),
        answer=getattr(target, field),
        holder=holder,
        field=field,
        person=target.name,
        distractors=tuple(name for name in names[1:] if similar(name, target.name)),
    )


def _names(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct full names: the asked person first, then a similar-named distractor."""
    first, surname = rng.choice(FIRST_NAMES), rng.choice(SURNAMES)
    names = [f"{first} {surname}", _similar_name(rng, first, surname)]
    while len(names) < count:
        name = f"{rng.choice(FIRST_NAMES)} {rng.choice(SURNAMES)}"
        if name not in names:
            names.append(name)
    return names[:count]


def _similar_name(rng: random.Random, first: str, surname: str) -> str:
    """Another person's name one small step away: same surname, or a near first name or surname."""
    kind = rng.choice(("near first", "near surname", "same surname"))
    if kind == "near first":
        return f"{_partner(first, FIRST_NAME_PAIRS)} {surname}"
    if kind == "near surname":
        return f"{first} {_partner(surname, SURNAME_PAIRS)}"
    return f"{rng.choice([name for name in FIRST_NAMES if name != first])} {surname}"


def _partner(name: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for a, b in pairs:
        if name in (a, b):
            return b if name == a else a
    raise ValueError(name)


def similar(a: str, b: str) -> bool:
    """Distinct names sharing a first name or surname, the other part at most two letters apart."""
    (first_a, surname_a), (first_b, surname_b) = a.split(" ", 1), b.split(" ", 1)
    if a == b:
        return False
    if surname_a == surname_b:
        return True
    return first_a == first_b and _edit_distance(surname_a, surname_b) <= 2


def _edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _person(rng: random.Random, name: str) -> Person:
    code = "".join(rng.choices(CODE_LETTERS, k=2)) + str(rng.randint(1000, 9999))
    date = f"{rng.randint(2015, 2024)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    return Person(name, code, str(rng.randint(100, 9999)), date, rng.choice(CITIES))


def _document(kind: str, people: list[Person]) -> str:
    return "\n".join([f"{kind}:", *(person.line() for person in people)])


def _answer_is_unique(item: Item) -> bool:
    """The gold occurs once in all documents together (hence in one party's) and not in the question."""
    return sum(text.count(item.answer) for text in item.documents) == 1 and item.answer not in item.question


def holders(item: Item) -> list[int]:
    """Indices of the documents that contain the gold answer (exactly ``[item.holder]`` by construction)."""
    return [index for index, text in enumerate(item.documents) if item.answer in text]
