"""Extract named fields from a sentence into a JSON object, scored by exact match.

The prompt lists the fields and gives one sentence; the answer is a JSON object with
exactly those keys. Scoring parses the first JSON object in the reply and compares it
with the expected object as Python values: key order does not matter, a missing or
extra key is wrong, types matter ("36" is not 36; numbers compare by value), strings
must match exactly (case included).
"""

from __future__ import annotations

import json

from loramux.skills.tasks import Example, Intent, TemplateTask, strip_fences

SYSTEM = "Extract the fields from the text. Reply with a JSON object only."

NAMES = (
    "Ada", "Bela", "Cyrus", "Dora", "Emil", "Fiona", "Goran", "Hana", "Ivo", "Jana",
    "Karim", "Lena", "Marco", "Nadia", "Oskar", "Petra", "Rafael", "Sofia", "Tomas", "Una",
    "Viktor", "Wanda", "Xavier", "Yara", "Zeno", "Agnes", "Boris", "Clara", "Dario", "Elsa",
)
CITIES = (
    "Lisbon", "Oslo", "Vienna", "Prague", "Dublin", "Madrid", "Warsaw", "Athens", "Zurich",
    "Munich", "Porto", "Krakow", "Lyon", "Seville", "Bergen", "Turin", "Ghent", "Riga",
    "Tallinn", "Bologna", "Vilnius", "Naples", "Bremen", "Geneva", "Malmo",
)
ITEMS = (
    "lamp", "chair", "kettle", "backpack", "monitor", "blender", "notebook", "helmet",
    "jacket", "toaster", "keyboard", "mirror", "pillow", "umbrella", "candle", "bicycle",
    "teapot", "wallet", "speaker", "blanket",
)
TOPICS = (
    "budget", "hiring", "security", "roadmap", "marketing", "training", "logistics",
    "pricing", "onboarding", "research", "design", "support", "legal", "sales", "testing",
)
PETS = (
    "Biscuit", "Pepper", "Mochi", "Rusty", "Luna", "Ziggy", "Nala", "Oreo", "Milo", "Coco",
    "Simba", "Pixel", "Waffles", "Juno", "Tofu",
)
SPECIES = (
    "cat", "dog", "rabbit", "parrot", "hamster", "turtle", "ferret", "goat", "pony",
    "lizard",
)


def _fields_prompt(fields: str, sentence: str) -> str:
    return f"Fields: {fields}\nText: {sentence}"


def _intent(name: str, fields: dict[str, str], sentences: tuple[str, ...], slots: dict,
            numeric: tuple[str, ...] = ()) -> Intent:
    """fields: JSON key → slot; keys appear in this order in prompt and reference."""

    def build(values, rng):
        obj = {key: values[slot] for key, slot in fields.items()}
        assert all(isinstance(obj[k], int) == (k in numeric) for k in obj)
        return json.dumps(obj), {"expected": obj}

    templates = tuple(_fields_prompt(", ".join(fields), s) for s in sentences)
    return Intent(name, templates, slots, build)


INTENTS = (
    _intent("person", {"name": "name", "age": "age", "city": "city"}, (
        "{name} is {age} years old and lives in {city}.",
        "Living in {city}, {name} turned {age} last month.",
        "{name} ({age}) moved to {city} in the spring.",
        "At {age}, {name} still calls {city} home.",
        "Our new neighbour in {city} is {name}, aged {age}.",
        "{city} resident {name} celebrated a {age}th birthday.",
    ), {"name": "name", "age": "age", "city": "city"}, numeric=("age",)),
    _intent("order", {"item": "item", "quantity": "quantity", "price": "price"}, (
        "I ordered {quantity} units of {item} at {price} dollars each.",
        "Please send {quantity} of the {item} model; the unit price is {price}.",
        "The invoice lists {item} x{quantity}, {price} per piece.",
        "We bought {quantity} {item} items for {price} each.",
        "Order: {quantity} pieces of {item}, priced at {price} apiece.",
        "Add {quantity} of item {item} to the cart at {price} per unit.",
    ), {"item": "item", "quantity": "quantity", "price": "price"},
        numeric=("quantity", "price")),
    _intent("trip", {"origin": "origin", "destination": "destination",
                     "passengers": "passengers"}, (
        "Book a train from {origin} to {destination} for {passengers} people.",
        "{passengers} travellers are flying {origin} to {destination} tomorrow.",
        "We need seats for {passengers} on the bus leaving {origin} for {destination}.",
        "A group of {passengers} will travel from {origin} to {destination}.",
        "Reserve {passengers} tickets, departing {origin}, arriving {destination}.",
        "From {origin} to {destination}: {passengers} passengers in total.",
    ), {"origin": "city", "destination": "city", "passengers": "count"},
        numeric=("passengers",)),
    _intent("meeting", {"organizer": "organizer", "topic": "topic", "room": "room"}, (
        "{organizer} booked room {room} for the {topic} meeting.",
        "The {topic} review, hosted by {organizer}, is in room {room}.",
        "Meet in room {room}: {organizer} will lead the {topic} session.",
        "{organizer} invites you to discuss {topic} in room {room}.",
        "Room {room} is reserved by {organizer} for a {topic} workshop.",
        "Join {organizer} in room {room} to talk about {topic}.",
    ), {"organizer": "name", "topic": "topic", "room": "room"}, numeric=("room",)),
    _intent("pet", {"name": "name", "species": "species", "age": "pet_age"}, (
        "{name} is a {pet_age}-year-old {species}.",
        "Our {species} {name} just turned {pet_age}.",
        "Meet {name}, a {species} who is {pet_age} years old.",
        "The shelter's {species}, {name}, is {pet_age} years of age.",
        "{name} the {species} will be {pet_age} next week.",
        "At {pet_age}, {name} is the oldest {species} on the farm.",
    ), {"name": "pet", "species": "species", "pet_age": "pet_age"}, numeric=("age",)),
)

POOLS = {
    "name": NAMES,
    "city": CITIES,
    "age": tuple(range(18, 78)),
    "item": ITEMS,
    "quantity": tuple(range(2, 42)),
    "price": tuple(range(5, 205, 5)),
    "count": tuple(range(2, 32)),
    "topic": TOPICS,
    "room": tuple(range(101, 141)),
    "pet": PETS,
    "species": SPECIES,
    "pet_age": tuple(range(1, 21)),
}


def extract_json(text: str) -> object:
    """The first JSON object in the reply (fences and surrounding text ignored), or
    None when there is none."""
    body = strip_fences(text)
    decoder = json.JSONDecoder()
    start = body.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(body, start)
            return obj
        except ValueError:
            start = body.find("{", start + 1)
    return None


class JsonTask(TemplateTask):
    """Field extraction to JSON; see the module docstring for scoring."""

    name = "json"
    system = SYSTEM
    intents = INTENTS
    pools = POOLS

    def extract(self, text: str) -> str:
        obj = extract_json(text)
        return "" if obj is None else json.dumps(obj)

    def score(self, prediction: str, example: Example) -> float:
        obj = extract_json(prediction)
        want = example.grading["expected"]
        return float(isinstance(obj, dict) and _same(obj, want))


def _same(got, want) -> bool:
    # bool is an int in Python; True must not match 1.
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(
            _same(got[k], want[k]) for k in want)
    if isinstance(got, bool) or isinstance(want, bool):
        return type(got) is type(want) and got == want
    return got == want and isinstance(got, str) == isinstance(want, str)
