"""Long demo texts whose later parts depend on earlier parts: the fanfics stories and the red_pajama documents.

A ~5M-parameter model trained for minutes on natural text barely uses context beyond a few dozen tokens (see
STACK_NOTES), so evaluation could not tell a 256-token window from a 512-token one. These texts are built so that a
large share of tokens is predictable **only** from earlier in the same document, at distances up to thousands of
tokens, through the one mechanism small transformers learn fastest: copying a span seen before (induction heads,
Olsson et al. 2022). Every document invents its own names (random syllables, never reused across documents), so
the model cannot memorise them; it can only look them up in context:

- a cast (story) or member list (registry) defined at the top — invented names with a home, a trade, an item and
  a five-digit number — and recalled all through the text with their attributes in fixed phrasing;
- a per-document refrain (a motto, a chorus) repeated verbatim;
- passkey documents in the format of Mohtashami & Jaggi (2023), as used by Chen et al. (2023): a key hidden in
  filler and asked for at the end.

Each mention is of a random member of the cast, so the last earlier mention of a name lies anywhere from a few
tokens to thousands back: a longer window contains more of them, and perplexity on a window's tail falls with the
window's length as far as the model can attend.

Only integer draws of `random.Random` are used (`randrange`, `choice`, `shuffle`), which are stable across Python
versions and platforms.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "r", "s", "t", "th", "v", "z",
          "qu", "sh", "st", "tr", "w", "y")
VOWELS = ("a", "e", "i", "o", "u", "ae", "ia", "ou", "ei", "y")
CODAS = ("", "", "", "n", "r", "l", "th", "s", "x", "m", "nd", "rk", "sk", "v")

TRADES = ("blacksmith", "weaver", "sailor", "healer", "scribe", "baker", "hunter", "miner", "potter", "archer",
          "farmer", "merchant", "tailor", "carpenter", "fisher", "herbalist", "mason", "cartographer", "brewer",
          "shepherd", "knight", "bard", "glassblower", "beekeeper", "astronomer", "ferryman", "locksmith", "cook")
ADJECTIVES = ("red", "blue", "green", "golden", "silver", "black", "white", "copper", "iron", "wooden", "old",
              "broken", "tiny", "heavy", "bright", "hidden", "crooked", "painted", "glass", "stone")
ITEMS = ("lantern", "key", "compass", "map", "sword", "flute", "ring", "book", "cloak", "shield", "bell", "mirror",
         "hammer", "bow", "cup", "coin", "crown", "dagger", "harp", "jar", "kite", "mask", "needle", "pipe", "rope",
         "scroll", "spoon", "staff", "whistle", "box")
PLACES = ("the market", "the harbour", "the old bridge", "the tower", "the mill", "the forest road", "the inn",
          "the chapel", "the city gate", "the orchard", "the library", "the river bank", "the hill", "the square")
WEATHER = ("rain", "wind", "snow", "fog", "sun", "storm", "frost", "mist")
TIMES = ("At dawn", "In the morning", "At noon", "In the afternoon", "At dusk", "That night", "Later",
         "Soon after", "Before long", "The next day")
ACTIONS = ("walked to {place}", "waited at {place}", "ran toward {place}", "looked back at {place}",
           "sang a quiet song near {place}", "counted the coins at {place}", "told a long story at {place}",
           "left {place} in silence", "found a letter at {place}", "laughed all the way to {place}")
MOTTO_WORDS = ("light", "river", "stone", "shadow", "morning", "silver", "wind", "promise", "door", "mountain",
               "song", "winter", "ember", "road", "salt", "feather", "crown", "glass", "thread", "harbour", "seed",
               "bell", "ash", "moon", "bread", "wolf", "candle", "ink", "rain", "honey")
MOTTO_LINKS = ("of", "and", "under", "before", "after", "beyond", "with", "without", "for", "against")

# The passkey format of Mohtashami & Jaggi (2023), "Landmark Attention", reused by Chen et al. (2023) for PI.
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                 "I will quiz you about the important information there.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is {key}."


def invented_word(rng: random.Random, syllables: int) -> str:
    """A capitalised nonsense word of `syllables` consonant-vowel(-coda) syllables, e.g. `Drouthmia`."""
    parts = [rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables)]
    parts[-1] += rng.choice(CODAS)
    return "".join(parts).capitalize()


def number_string(rng: random.Random, digits: int = 5) -> str:
    """A `digits`-digit decimal string without a leading zero."""
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


@dataclass(frozen=True)
class Person:
    """One invented cast member; every attribute is recalled verbatim later in the document."""

    first: str
    last: str
    home: str
    trade: str
    item: str
    number: str

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


def make_cast(rng: random.Random, size: int) -> list[Person]:
    """`size` people with distinct first names, last names and homes (so each name is an unambiguous key)."""
    cast: list[Person] = []
    used: set[str] = set()  # membership only, never iterated
    while len(cast) < size:
        first, last, home = invented_word(rng, 2), invented_word(rng, 2), invented_word(rng, 2)
        if used & {first, last, home} or len({first, last, home}) < 3:
            continue
        used |= {first, last, home}
        item = f"{rng.choice(ADJECTIVES)} {rng.choice(ITEMS)}"
        cast.append(Person(first, last, home, rng.choice(TRADES), item, number_string(rng)))
    return cast


def make_motto(rng: random.Random) -> str:
    """A per-document refrain: `word link word link word ...` with 6-9 random words (only copyable, never guessable)."""
    words = [rng.choice(MOTTO_WORDS)]
    for _ in range(rng.randrange(5, 8)):
        words += [rng.choice(MOTTO_LINKS), rng.choice(MOTTO_WORDS)]
    text = " ".join(words)
    return text[0].upper() + text[1:]


def _story_sentence(rng: random.Random, p: Person, other: Person, motto: str) -> str:
    """One sentence about `p`; most forms recall `p`'s attributes in the same words as the cast list."""
    action = rng.choice(ACTIONS).format(place=rng.choice(PLACES))
    form = rng.randrange(9)
    if form == 0:
        return f"{p.name} of {p.home}, the {p.trade}, {action}."
    if form == 1:
        return f"{p.name} lifted the {p.item} and {action}."
    if form == 2:
        return f"\"My number is {p.number},\" said {p.name} of {p.home}."
    if form == 3:
        return f"{rng.choice(TIMES)}, {p.name} the {p.trade} met {other.name} the {other.trade}."
    if form == 4:
        return f"\"{motto},\" said {p.name}, as the {rng.choice(WEATHER)} fell over {p.home}."
    if form == 5:
        return f"{p.name} gave the {p.item} to {other.name}, who returned it before {rng.choice(PLACES)} closed."
    if form == 6:
        return f"Everyone in {p.home} knew {p.name}, the {p.trade} with the {p.item}."
    if form == 7:
        return f"{p.name} wrote the number {p.number} on the wall of {rng.choice(PLACES)}."
    return f"{rng.choice(TIMES)}, {p.first} {action}."


def make_story(rng: random.Random, target_chars: int) -> dict[str, str]:
    """A fanfics row `{"TITLE", "TEXT"}`: a cast list, then chapters of sentences recalling the cast.

    Args:
        rng: the story's own stream.
        target_chars: the story stops at the first paragraph end past this length.

    Returns:
        `{"TITLE": str, "TEXT": str}` (the real dataset's field names).
    """
    cast = make_cast(rng, rng.randrange(8, 15))
    motto = make_motto(rng)
    town = invented_word(rng, 3)
    title = f"The {rng.choice(ADJECTIVES).capitalize()} {rng.choice(ITEMS).capitalize()} of {town}"
    lines = [title, "", "The people of this story:"]
    for p in cast:
        lines.append(f"{p.name} of {p.home}, the {p.trade}, who carries the {p.item}. Number: {p.number}.")
    lines += ["", f"Their old saying: \"{motto}.\"", ""]
    size = sum(len(line) + 1 for line in lines)
    chapter = 0
    while size < target_chars:
        if chapter == 0 or rng.randrange(6) == 0:
            chapter += 1
            lines += [f"Chapter {chapter}", ""]
        sentences = []
        for _ in range(rng.randrange(3, 7)):
            p, other = rng.sample(cast, 2)
            sentences.append(_story_sentence(rng, p, other, motto))
        paragraph = " ".join(sentences)
        lines += [paragraph, ""]
        size += len(paragraph) + 2
    lines.append("The end.")
    return {"TITLE": title, "TEXT": "\n".join(lines)}


def make_registry(rng: random.Random, target_chars: int) -> str:
    """A web-page-like member registry: records defined first, then notes that recall them by name."""
    town = invented_word(rng, 3)
    members = make_cast(rng, rng.randrange(6, 13))
    lines = [f"Registry of the {rng.choice(TRADES)}s' guild of {town}", "", "Members:"]
    for m in members:
        lines.append(f"- {m.name}, from {m.home}: member number {m.number}, keeps the {m.item}.")
    lines += ["", "Notes:"]
    size = sum(len(line) + 1 for line in lines)
    while size < target_chars:
        m = rng.choice(members)
        form = rng.randrange(4)
        if form == 0:
            line = f"- {m.name} (member number {m.number}) paid the fee at {rng.choice(PLACES)}."
        elif form == 1:
            line = f"- {m.name}, from {m.home}, asked to borrow a {rng.choice(ITEMS)}."
        elif form == 2:
            line = f"- Lost and found: a {m.item}. It belongs to {m.name}, member number {m.number}."
        else:
            line = f"- {m.name} from {m.home} will be away until the {rng.choice(WEATHER)} ends."
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)


def make_song(rng: random.Random, target_chars: int) -> str:
    """A song: verses of random motto words, and a chorus repeated verbatim after each verse."""
    chorus = [make_motto(rng) + "," for _ in range(2)]
    chorus[-1] = chorus[-1][:-1] + "."
    title = invented_word(rng, 3)
    lines = [f"Song of {title}", ""]
    size = len(lines[0]) + 1
    verse = 0
    while size < target_chars:
        verse += 1
        block = [f"Verse {verse}:"] + [make_motto(rng) + "," for _ in range(rng.randrange(2, 5))]
        block += ["", "Chorus:"] + chorus + [""]
        lines += block
        size += sum(len(line) + 1 for line in block)
    return "\n".join(lines)


def make_passkey(rng: random.Random, filler_repeats: int) -> str:
    """A passkey document: the intro, `filler_repeats` filler lines with the key line at a random depth, the question.

    The format is Mohtashami & Jaggi (2023)'s, so the evaluation's passkey probe is in the demo's distribution.
    """
    key = number_string(rng)
    depth = rng.randrange(filler_repeats + 1)
    body = [PASSKEY_FILLER] * filler_repeats
    body.insert(depth, PASSKEY_LINE.format(key=key))
    return " ".join([PASSKEY_INTRO, *body, PASSKEY_QUESTION.format(key=key)])


def make_web_document(rng: random.Random, index: int, target_chars: int) -> dict[str, str]:
    """A red_pajama row `{"text", "meta"}` (meta a JSON string, as in RedPajama) of one of the demo's kinds.

    Kinds, in turn: registry, song, passkey, registry (half the documents are registries).
    """
    kind = ("registry", "song", "passkey", "registry")[index % 4]
    if kind == "registry":
        text = make_registry(rng, target_chars)
    elif kind == "song":
        text = make_song(rng, target_chars // 2)
    else:
        text = make_passkey(rng, rng.randrange(4, max(5, target_chars // len(PASSKEY_FILLER))))
    meta = {"source": "orca8k-demo", "kind": kind, "url": f"https://demo.orca8k.invalid/{kind}/{index}",
            "language": "en"}
    return {"text": text, "meta": json.dumps(meta, ensure_ascii=True)}
