"""Skill tasks: template-generated examples with held-out splits, and their scorers.

A task is a set of *intents* (what the answer computes: "count the employees of a
department"), each asked through several *templates* (wordings of the question) with
*slots* filled from *value pools* (department names, thresholds, ...).

Splits are disjoint by template and by value, so a test score measures the skill and
not memory of training items:
- per intent, templates are dealt to splits by index (`split_of_template`): a test
  question is always worded in a way no training question was;
- every pool is dealt the same way (`deal_pools`; a value in several pools goes to
  one split): a test question only uses values no training or validation question
  uses.
Intents are shared by all splits (the model must learn *what* to compute from
training and apply it to new wordings and new values). The assignment is fixed, not
seeded, so no seed can leak test items into training; the seed only drives which
combinations are drawn. Splits are balanced across intents; a split holds at most
the distinct prompts its templates × values allow, which can be less than asked for.

Every task offers `examples(split)`, `extract(text)` (the answer inside a model's
reply: fences and chatter stripped) and `score(text, example)` (1.0 or 0.0).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

SPLITS = ("train", "validation", "test")
# Index i of a pool goes to SPLIT_OF_RESIDUE[i % 5]: 60% train, 20% validation, 20% test.
# Index i of an intent's template list goes to SPLIT_OF_RESIDUE[i] for i < 5 and to train
# beyond (3 validation, 4 test, every other index train): extra wordings only widen training.
SPLIT_OF_RESIDUE = ("train", "train", "train", "validation", "test")
DEFAULT_SIZES = {"train": 2000, "validation": 100, "test": 200}
# Give up drawing once this many draws in a row produced no new prompt.
MAX_STALE_DRAWS = 2000


@dataclass(frozen=True)
class Example:
    """One item of a task.

    prompt_messages: chat messages (system + user) the model answers.
    reference: the canonical answer text (the training target).
    template_id: "<task>/<intent>/<template index>"; splits never share one.
    values: (pool, value) pairs that filled the template's slots; splits never
      share a value.
    grading: task-specific data the scorer needs (hidden tests, expected object,
      whether order matters); never shown to the model.
    """

    task: str
    prompt_messages: tuple[Mapping[str, str], ...]
    reference: str
    template_id: str
    values: tuple[tuple[str, object], ...]
    grading: Mapping[str, object] = field(default_factory=dict, compare=False)

    @property
    def prompt(self) -> str:
        """The user turn, for display and de-duplication."""
        return self.prompt_messages[-1]["content"]


@dataclass(frozen=True)
class Intent:
    """What one family of questions computes.

    templates: wordings with `{slot}` placeholders (str.format).
    slots: slot name → pool name; slots sharing a pool get distinct values
      (numbers in increasing order of declaration, for ranges).
    build: (slot values, rng) → (reference answer, grading data), or None to reject
      the values (the draw is discarded). rng may be used for hidden test inputs; it
      is derived from the task seed and the prompt.
    """

    name: str
    templates: tuple[str, ...]
    slots: Mapping[str, str]
    build: Callable[
        [Mapping[str, object], random.Random], tuple[str, Mapping[str, object]] | None
    ]


class Task(Protocol):
    name: str

    def examples(self, split: str) -> list[Example]: ...

    def extract(self, text: str) -> str: ...

    def score(self, prediction: str, example: Example) -> float: ...


def split_of_index(i: int) -> str:
    return SPLIT_OF_RESIDUE[i % len(SPLIT_OF_RESIDUE)]


def split_of_template(i: int) -> str:
    return SPLIT_OF_RESIDUE[i] if i < len(SPLIT_OF_RESIDUE) else "train"


def deal_pools(pools: Mapping[str, Sequence]) -> dict[str, dict[str, list]]:
    """pool → split → its values. A value is dealt by its index in the first pool
    (in mapping order) that holds it, and every other pool follows that choice, so
    no value reaches two splits even when pools overlap (5 as a count and as a size)."""
    split_of: dict[object, str] = {}
    out: dict[str, dict[str, list]] = {}
    for name, values in pools.items():
        out[name] = {split: [] for split in SPLITS}
        for i, value in enumerate(values):
            split = split_of.setdefault(value, split_of_index(i))
            out[name][split].append(value)
    return out


def generate(
    task: str,
    system: str,
    intents: Sequence[Intent],
    pools: Mapping[str, Sequence],
    split: str,
    n: int,
    seed: int,
) -> list[Example]:
    """Draw up to `n` distinct examples of `split`, deterministically from `seed`.

    Each draw picks an intent uniformly, one of its templates of this split and
    slot values from this split's part of each pool. No intent gets more than
    ceil(n / number of intents) examples, so a split is balanced across intents; it
    holds fewer than n when some intents run out of distinct prompts.
    """
    _check_split(split)
    rng = random.Random(f"{task}/{split}/{seed}")
    split_pools = {name: dealt[split] for name, dealt in deal_pools(pools).items()}
    choices = [
        (intent, i)
        for intent in intents
        for i in range(len(intent.templates))
        if split_of_template(i) == split
    ]
    by_intent: dict[str, list[int]] = {}
    for intent, i in choices:
        by_intent.setdefault(intent.name, []).append(i)
    usable = [intent for intent in intents if intent.name in by_intent]
    # Balanced: no intent gets more than its share, even when others run out of
    # distinct prompts (so the split may hold fewer than n).
    cap = -(-n // max(1, len(usable)))
    count = dict.fromkeys(by_intent, 0)
    out: list[Example] = []
    seen: set[str] = set()
    stale = 0
    while len(out) < n and stale < MAX_STALE_DRAWS and usable:
        intent = rng.choice(usable)
        t = rng.choice(by_intent[intent.name])
        values = _draw_slots(intent.slots, split_pools, rng)
        prompt = intent.templates[t].format(**values)
        if prompt in seen:
            stale += 1
            continue
        seen.add(prompt)
        # Hidden test inputs come from their own stream so they do not shift the draws.
        built = intent.build(values, random.Random(f"{seed}/{prompt}"))
        if built is None:  # the intent rejects these values (e.g. an empty answer)
            stale += 1
            continue
        reference, grading = built
        stale = 0
        count[intent.name] += 1
        if count[intent.name] == cap:
            usable.remove(intent)
        out.append(
            Example(
                task=task,
                prompt_messages=(
                    {"role": "system", "content": system},
                    {"role": "user", "content": prompt},
                ),
                reference=reference,
                template_id=f"{task}/{intent.name}/{t}",
                values=tuple((intent.slots[s], v) for s, v in sorted(values.items())),
                grading=grading,
            )
        )
    return out


def _draw_slots(slots: Mapping[str, str], pools: Mapping[str, list], rng) -> dict:
    by_pool: dict[str, list[str]] = {}
    for slot, pool in slots.items():
        by_pool.setdefault(pool, []).append(slot)
    values = {}
    for pool, names in by_pool.items():
        drawn = rng.sample(pools[pool], len(names))
        if all(isinstance(v, int) for v in drawn):
            drawn.sort()  # "between {low} and {high}" reads in order
        values.update(zip(names, drawn))
    return values


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")


# A language tag counts only when a newline follows it: in "```SELECT 1```" SELECT is code.
_FENCE = re.compile(r"```[ \t]*(?:[A-Za-z0-9_+-]+[ \t]*\n)?(.*?)(?:```|$)", re.S)


def strip_fences(text: str) -> str:
    """The content of the first ``` fenced block, else the text; stripped."""
    m = _FENCE.search(text)
    return (m.group(1) if m else text).strip()


class TemplateTask:
    """A Task whose examples come from `generate`; subclasses set the class fields
    and implement `extract` and `score`."""

    name: str = ""
    system: str = ""
    intents: tuple[Intent, ...] = ()
    pools: Mapping[str, Sequence] = {}

    def __init__(self, seed: int = 0, sizes: Mapping[str, int] | None = None):
        self.seed = seed
        self.sizes = dict(DEFAULT_SIZES if sizes is None else sizes)

    def examples(self, split: str) -> list[Example]:
        _check_split(split)
        return generate(
            self.name, self.system, self.intents, self.pools, split,
            self.sizes.get(split, DEFAULT_SIZES[split]), self.seed,
        )


def make_task(name: str, seed: int = 0, sizes: Mapping[str, int] | None = None) -> Task:
    """Build the task called `name` ("sql", "python" or "json")."""
    from loramux.skills import fields, pycode, sql

    registry = {"sql": sql.SqlTask, "python": pycode.PythonTask, "json": fields.JsonTask}
    if name not in registry:
        raise ValueError(f"unknown task {name!r}; known: {sorted(registry)}")
    return registry[name](seed=seed, sizes=sizes)


TASK_NAMES = ("sql", "python", "json")
