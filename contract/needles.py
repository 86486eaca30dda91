"""Needle-in-a-haystack prompts with checkable answers (stdlib only: the server, the evals, the
benchmarks and the load tester all build their prompts here).

Haystacks are varied prose drawn from several topics so a method cannot win by spotting the
one sentence that differs in style; needles come in several shapes (numbers, words, codes)
with random keys and values. Everything is deterministic given the seed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

TOPICS: dict[str, list[str]] = {
    "sea": [
        "The harbour at dawn was full of small boats returning with the night's catch.",
        "Tides along this coast rise twice a day, and the fishermen plan their work around them.",
        "Old sailors say the wind changes direction just before a storm reaches the bay.",
        "A lighthouse keeper once kept a diary of every ship that passed the northern rocks.",
        "Salt marshes behind the dunes shelter thousands of migrating birds each autumn.",
        "The ferry crossing takes forty minutes when the sea is calm and much longer when it is not.",
    ],
    "kitchen": [
        "Bread rises faster in a warm kitchen, so bakers in winter often start their dough earlier.",
        "A good stock simmers for hours with bones, onions, carrots and a handful of herbs.",
        "Many cooks prefer cast iron pans because they hold heat evenly across the surface.",
        "The recipe calls for two cups of flour, a pinch of salt and a little melted butter.",
        "Fresh tomatoes taste best in late summer, when they ripen slowly on the vine.",
        "Pickling vegetables was once the only way to keep them through the long winter months.",
    ],
    "sky": [
        "On clear nights the band of the galaxy stretches from one horizon to the other.",
        "Astronomers measure the distance to nearby stars by watching them shift over a year.",
        "The moon always shows the same face to the earth because of tidal locking.",
        "Comets brighten as they approach the sun and grow tails that point away from it.",
        "A small telescope is enough to see the rings of the sixth planet on a steady night.",
        "Meteor showers happen when the earth passes through dust left behind by a comet.",
    ],
    "city": [
        "The market square fills with stalls every Saturday morning, selling fruit and cheese.",
        "Trams have run along the river avenue for more than a hundred years.",
        "The town council debated for months before approving the new library building.",
        "Narrow lanes in the old quarter were designed long before anyone imagined cars.",
        "Street musicians play near the station in the evenings when commuters head home.",
        "A clock tower at the centre of town still rings every hour, though slightly late.",
    ],
    "forest": [
        "Oak trees can live for several centuries and support hundreds of species of insects.",
        "After the rain, the path through the pines smelled of resin and wet earth.",
        "Foresters mark the oldest trees so that they are left standing during thinning.",
        "Mushrooms appear in the autumn, often in rings around the base of old trees.",
        "A family of deer crossed the clearing at dusk and disappeared into the ferns.",
        "The river that runs through the valley was once used to float timber to the mills.",
    ],
    "trade": [
        "Merchants in the old days carried spices, silk and silver along the caravan routes.",
        "Prices at the port depended on how many ships arrived before the winter storms.",
        "The guild kept careful records of every contract signed by its members.",
        "Bankers in the river towns lent money to traders against the value of their cargo.",
        "A weekly newspaper printed the prices of grain, wool and coal for the whole region.",
        "Small workshops along the canal made rope, barrels and sails for the shipyards.",
    ],
}

CONNECTIVES = ["", "", "", "Meanwhile, ", "In those years, ", "Even so, ", "By contrast, ", "As a rule, "]

PLACES = [
    "Lisbon",
    "Oslo",
    "Nairobi",
    "Kyoto",
    "Lima",
    "Tbilisi",
    "Quebec",
    "Hanoi",
    "Dakar",
    "Perth",
    "Bergen",
    "Seville",
    "Cusco",
    "Tallinn",
    "Zagreb",
    "Porto",
    "Accra",
    "Busan",
    "Tromso",
    "Malmo",
]
OBJECTS = [
    "red door",
    "blue chest",
    "garden gate",
    "tower vault",
    "iron safe",
    "cellar lock",
    "silver box",
    "north gate",
    "library vault",
    "old locker",
]
WORDS = [
    "lantern",
    "orchid",
    "granite",
    "velvet",
    "compass",
    "harbor",
    "falcon",
    "meadow",
    "saffron",
    "glacier",
    "juniper",
    "copper",
    "thistle",
    "marble",
    "cobalt",
    "willow",
]
ANIMALS = ["otter", "heron", "lynx", "badger", "gecko", "walrus", "ibis", "marmot", "puffin", "tapir"]


@dataclass(frozen=True)
class Needle:
    sentence: str
    question: str
    answer: str

    def found_in(self, text: str) -> bool:
        """Is the answer in ``text``? Digits compared without separators, words without case."""
        if self.answer.isdigit():
            return self.answer in re.sub(r"[,\s]", "", text)
        return self.answer.lower() in text.lower()


def make_needle(rng: random.Random) -> Needle:
    kind = rng.randrange(4)
    if kind == 0:
        place, number = rng.choice(PLACES), str(rng.randint(1000000, 9999999))
        return Needle(
            f"The special magic number for {place} is {number}.",
            f"What is the special magic number for {place}?",
            number,
        )
    if kind == 1:
        thing, word = rng.choice(OBJECTS), rng.choice(WORDS)
        return Needle(
            f"The password to open the {thing} is {word}.",
            f"What is the password to open the {thing}?",
            word,
        )
    if kind == 2:
        place, number = rng.choice(PLACES), str(rng.randint(100, 999))
        return Needle(
            f"The train to {place} leaves from platform {number}.",
            f"From which platform does the train to {place} leave?",
            number,
        )
    place, animal = rng.choice(PLACES), rng.choice(ANIMALS)
    return Needle(
        f"The mascot of the {place} football club is a {animal}.",
        f"What animal is the mascot of the {place} football club?",
        animal,
    )


def filler_sentences(rng: random.Random, count: int) -> list[str]:
    """``count`` sentences, a few per topic at a time, so the text drifts like real documents."""
    topics = list(TOPICS)
    out: list[str] = []
    while len(out) < count:
        topic = TOPICS[rng.choice(topics)]
        for sentence in rng.sample(topic, k=rng.randint(2, 4)):
            connective = rng.choice(CONNECTIVES)
            out.append(connective + sentence[0].lower() + sentence[1:] if connective else sentence)
    return out[:count]


@dataclass(frozen=True)
class HaystackCase:
    document: str
    needle: Needle
    depth: float  # 0.0 = start of the document, 1.0 = end

    def user_message(self) -> str:
        return (
            "Read the document below and answer the question at the end.\n\n"
            f"{self.document}\n\n"
            f"Question: {self.needle.question} Answer in a few words."
        )

    def completion_prompt(self) -> str:
        """For base models with no chat template: the answer continues the text."""
        return f"{self.document}\n\nQuestion: {self.needle.question}\nAnswer: The answer is"


def approx_tokens(text: str) -> int:
    return max(1, len(text) // 4)


def build_case(
    target_tokens: int,
    depth: float,
    seed: int,
    count_tokens: Callable[[str], int] = approx_tokens,
    needle: Needle | None = None,
) -> HaystackCase:
    """A document of about ``target_tokens`` tokens (as ``count_tokens`` counts them, for the
    whole user message) with a needle at relative ``depth``."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(seed)
    needle = needle or make_needle(rng)
    pool = filler_sentences(rng, max(64, target_tokens // 4))

    def case_with(count: int) -> HaystackCase:
        while len(pool) < count:
            pool.extend(filler_sentences(rng, count))
        sentences = pool[:count]
        at = round(depth * len(sentences))
        body = [*sentences[:at], needle.sentence, *sentences[at:]]
        return HaystackCase(" ".join(body), needle, depth)

    # Grow, then binary-search the sentence count that lands at or just under the target.
    low, high = 0, 16
    while count_tokens(case_with(high).user_message()) < target_tokens:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        if count_tokens(case_with(mid).user_message()) <= target_tokens:
            low = mid
        else:
            high = mid
    return case_with(low)


def depths(count: int) -> list[float]:
    """``count`` evenly spread depths from 0 to 1 inclusive."""
    if count == 1:
        return [0.5]
    return [i / (count - 1) for i in range(count)]
