"""Small Python functions from a one-sentence description, scored by hidden tests.

The prompt names the function and its parameters and says what it returns, with
values (thresholds, letters, separators) filled in. The hidden tests are argument
lists drawn per example (seeded) plus edge cases (empty inputs); expected values come
from a trusted oracle in this module. The model's code runs only in the sandbox
(`loramux.skills.sandbox`): a separate process with time, memory and file limits, no
network, no writes. An answer is right when it defines the function and every hidden
test returns the expected value with the same JSON type (True is not 1). Function
names come from a pool dealt to splits like every other value, so the model must read
the description rather than recognise a name.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass

from loramux.skills.sandbox import SandboxLimits, run_function, same_value
from loramux.skills.tasks import Example, Intent, TemplateTask, strip_fences

SYSTEM = "Write the Python function. Reply with code only."
NUM_TESTS = 6

FUNCTION_NAMES = (
    "solve", "compute", "process", "transform", "calc", "handle", "apply_rule", "evaluate",
    "helper", "work", "func", "answer", "make", "get_value", "convert", "pick", "build",
    "check", "select", "measure",
)
LETTERS = tuple("abcdefghijklmnoprstu")
SEPARATORS = ("-", "+", "*", "/", ":", ";", "|", "#", "=", "~", ".", "_", "!", "?", "&")


@dataclass(frozen=True)
class Spec:
    """One function family: signature, reference body, oracle and input generator.

    params: the parameter list as written in the prompt, e.g. "xs".
    body: the reference body (str.format with the slot values), one expression.
    oracle: (values, *args) → the expected result.
    inputs: (values, rng) → argument lists for the hidden tests.
    """

    params: str
    body: str
    oracle: Callable
    inputs: Callable[[dict, random.Random], list[list]]


def _int_lists(values, rng: random.Random) -> list[list]:
    k = values.get("k", 5)
    lists = [[], [k], [k + 1, k - 1, 2 * k]]
    while len(lists) < NUM_TESTS:
        lists.append([rng.randrange(-5, 3 * k + 10) for _ in range(rng.randrange(2, 9))])
    return [[xs] for xs in lists]


def _ints(values, rng: random.Random) -> list[list]:
    k = values.get("k", 5)
    ns = [0, k, 2 * k + 1, -k]
    while len(ns) < NUM_TESTS:
        ns.append(rng.randrange(-60, 60))
    return [[n] for n in ns]


def _texts(values, rng: random.Random) -> list[list]:
    letters = [v for v in values.values() if isinstance(v, str) and len(v) == 1]
    alphabet = "".join(letters) * 3 + string.ascii_lowercase + " "
    texts = ["", "".join(letters)]
    while len(texts) < NUM_TESTS:
        texts.append("".join(rng.choice(alphabet) for _ in range(rng.randrange(3, 16))))
    return [[t] for t in texts]


def _word_lists(values, rng: random.Random) -> list[list]:
    c = values.get("c", "a")
    lists = [[], [c], [c + "x", "x" + c, c * 3]]
    while len(lists) < NUM_TESTS:
        lists.append([
            (c if rng.random() < 0.4 else rng.choice(string.ascii_lowercase))
            + "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randrange(0, 6)))
            for _ in range(rng.randrange(1, 6))
        ])
    return [[ws] for ws in lists]


def _sentences(values, rng: random.Random) -> list[list]:
    k = values["k"]
    out = ["", "a" * k, "b" * (k + 1) + " c"]
    while len(out) < NUM_TESTS:
        out.append(" ".join(
            "".join(rng.choice("abcdefgh") for _ in range(rng.randrange(1, k + 4)))
            for _ in range(rng.randrange(1, 7))
        ))
    return [[s] for s in out]


SPECS = {
    "sum_above": Spec("xs", "sum(x for x in xs if x > {k})",
                      lambda v, xs: sum(x for x in xs if x > v["k"]), _int_lists),
    "divisible": Spec("xs", "[x for x in xs if x % {k} == 0]",
                      lambda v, xs: [x for x in xs if x % v["k"] == 0], _int_lists),
    "scale": Spec("xs", "[x * {k} for x in xs]",
                  lambda v, xs: [x * v["k"] for x in xs], _int_lists),
    "add_each": Spec("xs", "[x + {k} for x in xs]",
                     lambda v, xs: [x + v["k"] for x in xs], _int_lists),
    "max_or": Spec("xs", "max(xs) if xs else {k}",
                   lambda v, xs: max(xs) if xs else v["k"], _int_lists),
    "first_n": Spec("xs", "xs[:{n}]", lambda v, xs: xs[: v["n"]], _int_lists),
    "linear": Spec("n", "n * {k} + {m}", lambda v, n: n * v["k"] + v["m"], _ints),
    "is_multiple": Spec("n", "n % {k} == 0", lambda v, n: n % v["k"] == 0, _ints),
    "clamp": Spec("n", "max({lo}, min({hi}, n))",
                  lambda v, n: max(v["lo"], min(v["hi"], n)), _ints),
    "count_char": Spec("s", "s.count('{c}')", lambda v, s: s.count(v["c"]), _texts),
    "replace_char": Spec("s", "s.replace('{a}', '{b}')",
                         lambda v, s: s.replace(v["a"], v["b"]), _texts),
    "starts_with": Spec("words", "[w for w in words if w.startswith('{c}')]",
                        lambda v, ws: [w for w in ws if w.startswith(v["c"])], _word_lists),
    "join_with": Spec("words", "'{sep}'.join(words)",
                      lambda v, ws: v["sep"].join(ws), _word_lists),
    "long_words": Spec("s", "sum(1 for w in s.split() if len(w) > {k})",
                       lambda v, s: sum(1 for w in s.split() if len(w) > v["k"]), _sentences),
}

# Per family: 12 wordings (index 3 validation, 4 test, every other index train) and slot pools.
TEMPLATES = {
    "sum_above": ((
        "Write a Python function {fn}(xs) that returns the sum of the numbers in xs that "
        "are greater than {k}.",
        "Define {fn}(xs): add up the elements of xs bigger than {k} and return the total.",
        "Implement {fn}(xs). It returns the total of all values in xs above {k}.",
        "Create a function {fn}(xs) returning the sum of every item of xs exceeding {k}.",
        "I need {fn}(xs), which sums only those numbers in xs that are larger than {k}.",
        "Write {fn}(xs) to compute the sum of the entries of xs strictly greater than {k}.",
        "Please code {fn}(xs) so that it returns the total of the elements "
        "of xs strictly above {k}.",
        "{fn}(xs) -> int: the sum of all x in xs with x > {k}.",
        "Could you write {fn}(xs)? It should add together every number of xs that exceeds {k}.",
        "Given a list of integers xs, {fn} returns the sum of those greater than "
        "{k} (0 if there are none).",
        "We want {fn}(xs) to skip every number of xs that is {k} or less and "
        "return the sum of the rest.",
        "Task: {fn} takes a list xs; its result is the sum of the values in xs bigger than {k}.",
    ), {"fn": "fn", "k": "num"}),
    "divisible": ((
        "Write a Python function {fn}(xs) that returns the numbers in xs divisible by {k}, "
        "in order.",
        "Define {fn}(xs): keep the elements of xs that are multiples of {k}.",
        "Implement {fn}(xs). It returns a list of the values in xs evenly divisible by {k}.",
        "Create a function {fn}(xs) that filters xs down to the multiples of {k}.",
        "I need {fn}(xs), returning every number of xs with remainder 0 when divided by {k}.",
        "Write {fn}(xs) to return the items of xs that {k} divides exactly.",
        "Give me a function {fn}(xs) returning the numbers of xs that are divisible by "
        "{k}, kept in their order.",
        "{fn}(xs) -> list: the x in xs with x % {k} == 0, in the same order as in xs.",
        "Can you code {fn}(xs) so it drops every element of xs that is not a multiple of {k}?",
        "The function {fn}(xs) should return, in order, only those entries of xs "
        "that {k} goes into evenly.",
        "My script requires {fn}(xs): the sublist of xs made of the multiples of {k}.",
        "Filter a list in {fn}(xs): the result holds each value of xs divisible by {k}, in order.",
    ), {"fn": "fn", "k": "num"}),
    "scale": ((
        "Write a Python function {fn}(xs) that returns a new list with every element of xs "
        "multiplied by {k}.",
        "Define {fn}(xs): multiply each number in xs by {k} and return the list.",
        "Implement {fn}(xs). It returns xs with all values times {k}.",
        "Create a function {fn}(xs) that scales each item of xs by a factor of {k}.",
        "I need {fn}(xs), which returns the list of x * {k} for each x in xs.",
        "Write {fn}(xs) to return the elements of xs, each multiplied by {k}.",
        "Please implement {fn}(xs) returning a new list in which each value of "
        "xs is multiplied by {k}.",
        "{fn}(xs) -> list: every element of xs times {k}, in the same order.",
        "How would you write {fn}(xs) so that it multiplies each item of xs by {k} and "
        "returns the results as a list?",
        "Given a list of numbers xs, {fn} returns the list you get by "
        "multiplying every entry by {k}.",
        "I want a function {fn}(xs) whose output has, at each position i, the value xs[i] * {k}.",
        "Return value of {fn}(xs): a list as long as xs where each number has "
        "been multiplied by {k}.",
    ), {"fn": "fn", "k": "num"}),
    "add_each": ((
        "Write a Python function {fn}(xs) that returns a new list with {k} added to every "
        "element of xs.",
        "Define {fn}(xs): add {k} to each number in xs and return the list.",
        "Implement {fn}(xs). It returns xs with every value increased by {k}.",
        "Create a function {fn}(xs) that shifts each item of xs up by {k}.",
        "I need {fn}(xs), which returns the list of x + {k} for each x in xs.",
        "Write {fn}(xs) to return the elements of xs, each plus {k}.",
        "Could you write {fn}(xs)? It must return a list where each value of xs "
        "has had {k} added to it.",
        "{fn}(xs) -> list: xs with {k} added to each element, order preserved.",
        "Please code {fn}(xs) to increment all numbers in xs by {k} and return them as a new list.",
        "Given a list of numbers xs, {fn} returns a list whose i-th item is xs[i] + {k}.",
        "We want {fn}(xs) to give back a copy of xs in which every entry is {k} larger.",
        "Task: inside {fn}(xs), add the constant {k} to each element of the list xs "
        "and return the new list.",
    ), {"fn": "fn", "k": "num"}),
    "max_or": ((
        "Write a Python function {fn}(xs) that returns the largest number in xs, or {k} "
        "if xs is empty.",
        "Define {fn}(xs): return the maximum of xs; for an empty list return {k}.",
        "Implement {fn}(xs). It gives the biggest value of xs, and {k} when xs has no items.",
        "Create a function {fn}(xs) returning max of xs, defaulting to {k} for an empty xs.",
        "I need {fn}(xs), which returns the greatest element of xs or {k} if there is none.",
        "Write {fn}(xs) to find the highest number in xs ({k} when xs is empty).",
        "Please write {fn}(xs) that returns the maximum value of xs, or {k} "
        "when the list is empty.",
        "{fn}(xs) -> max(xs), falling back to {k} for an empty list.",
        "Can you code {fn}(xs)? If xs is empty it returns {k}; otherwise it "
        "returns the largest item.",
        "Given a list of integers xs, {fn} returns its top value; an empty xs yields {k} instead.",
        "I'd like a function {fn}(xs) that reports the highest number in xs and uses {k} as the "
        "default when there are no numbers.",
        "Return value of {fn}(xs): the largest entry of xs, or {k} if xs contains nothing.",
    ), {"fn": "fn", "k": "num"}),
    "first_n": ((
        "Write a Python function {fn}(xs) that returns the first {n} elements of xs.",
        "Define {fn}(xs): return a list of the leading {n} items of xs.",
        "Implement {fn}(xs). It keeps only the first {n} values of xs.",
        "Create a function {fn}(xs) that returns xs cut to its first {n} entries.",
        "I need {fn}(xs), which returns at most {n} elements from the start of xs.",
        "Write {fn}(xs) to take the first {n} numbers of xs.",
        "Give me a function {fn}(xs) that returns the first {n} items of xs (all "
        "of xs if it is shorter).",
        "{fn}(xs) -> list: xs truncated to its first {n} elements.",
        "Could you implement {fn}(xs) so that it returns the opening {n} entries of xs?",
        "Given a list xs, {fn} returns the prefix of xs of length {n}, or the whole list "
        "when it has fewer items.",
        "We want {fn}(xs) to keep the first {n} values of xs, in order, and discard the rest.",
        "Output of {fn}(xs): the beginning of xs, up to {n} elements long.",
    ), {"fn": "fn", "n": "small"}),
    "linear": ((
        "Write a Python function {fn}(n) that returns {k} times n plus {m}.",
        "Define {fn}(n): multiply n by {k}, add {m} and return the result.",
        "Implement {fn}(n). It returns n * {k} + {m}.",
        "Create a function {fn}(n) computing {m} more than {k} times n.",
        "I need {fn}(n), which gives the value of {k}n + {m}.",
        "Write {fn}(n) to return n multiplied by {k}, then increased by {m}.",
        "Please write {fn}(n) so it returns n times {k}, plus {m}.",
        "{fn}(n) -> int: {k} * n + {m}.",
        "Could you code {fn}(n)? It should take the product of n and {k} and add {m} to it.",
        "Given an integer n, {fn} returns the product {k} * n increased by {m}.",
        "I want a function {fn}(n) evaluating the linear expression {k}*n + {m}.",
        "Return value of {fn}(n): n scaled by {k}, then shifted up by {m}.",
    ), {"fn": "fn", "k": "num", "m": "num"}),
    "is_multiple": ((
        "Write a Python function {fn}(n) that returns True if n is a multiple of {k}, "
        "otherwise False.",
        "Define {fn}(n): return whether n is divisible by {k}.",
        "Implement {fn}(n). It returns True exactly when {k} divides n.",
        "Create a function {fn}(n) that checks if n divided by {k} leaves no remainder.",
        "I need {fn}(n), which tells (True/False) whether n is evenly divisible by {k}.",
        "Write {fn}(n) to test if n is a multiple of {k}; return a bool.",
        "Please implement {fn}(n) returning True when n is divisible by {k} "
        "and False when it is not.",
        "{fn}(n) -> bool: is n a multiple of {k}?",
        "Can you write {fn}(n)? It should return True if n mod {k} equals 0, else False.",
        "Given an integer n, {fn} returns a boolean saying whether {k} goes into n evenly.",
        "We want {fn}(n) to report, as True or False, whether n is a whole multiple of {k}.",
        "Goal: {fn}(n) gives True for multiples of {k} and False for every other n.",
    ), {"fn": "fn", "k": "num"}),
    "clamp": ((
        "Write a Python function {fn}(n) that returns n limited to the range {lo} to {hi}.",
        "Define {fn}(n): clamp n between {lo} and {hi} and return it.",
        "Implement {fn}(n). It returns {lo} if n is below {lo}, {hi} if above {hi}, else n.",
        "Create a function {fn}(n) that forces n into the interval [{lo}, {hi}].",
        "I need {fn}(n), which returns n but never less than {lo} or more than {hi}.",
        "Write {fn}(n) to bound n to at least {lo} and at most {hi}.",
        "Code a function {fn}(n) that returns n clamped to the closed interval from {lo} to {hi}.",
        "{fn}(n) -> int: n, but raised to {lo} if smaller and lowered to {hi} if larger.",
        "Would you write {fn}(n)? Values under {lo} become {lo}, values over {hi} become {hi}, "
        "and others are returned unchanged.",
        "For an integer n, {fn}(n) is the number between {lo} and {hi} "
        "(inclusive) that is closest to n.",
        "My program wants {fn}(n) to keep n within {lo}..{hi}, returning the nearest "
        "bound when n falls outside.",
        "Return value of {fn}(n): n saturated at a floor of {lo} and a ceiling of {hi}.",
    ), {"fn": "fn", "lo": "num", "hi": "num"}),
    "count_char": ((
        "Write a Python function {fn}(s) that returns how many times the letter '{c}' "
        "occurs in s.",
        "Define {fn}(s): count the occurrences of '{c}' in the string s.",
        "Implement {fn}(s). It returns the number of '{c}' characters in s.",
        "Create a function {fn}(s) that counts how often '{c}' appears in s.",
        "I need {fn}(s), which tells how many '{c}' letters the string s contains.",
        "Write {fn}(s) to return the count of the character '{c}' in s.",
        "Please write {fn}(s) returning the number of times '{c}' shows up in the string s.",
        "Spec: {fn}(s) -> int, the number of occurrences of the character '{c}' in s.",
        "How would you code {fn}(s) so that it tallies the '{c}' characters in "
        "s and returns the tally?",
        "{fn} takes a string s and returns how many of its characters are equal to '{c}'.",
        "I'd like {fn}(s) to count every '{c}' in s, returning 0 if there is none.",
        "Exercise: {fn}(s) should give how many positions of s hold the letter '{c}'.",
    ), {"fn": "fn", "c": "letter"}),
    "replace_char": ((
        "Write a Python function {fn}(s) that returns s with every '{a}' replaced by "
        "'{b}'.",
        "Define {fn}(s): replace each '{a}' in s with '{b}' and return the result.",
        "Implement {fn}(s). It returns a copy of s where all '{a}' become '{b}'.",
        "Create a function {fn}(s) that swaps every '{a}' character of s for a '{b}'.",
        "I need {fn}(s), which turns each '{a}' in s into '{b}'.",
        "Write {fn}(s) to substitute '{b}' for every occurrence of '{a}' in s.",
        "Build {fn}(s) so that it returns s after replacing all occurrences of '{a}' with '{b}'.",
        "{fn}(s) -> str: s with each '{a}' changed to '{b}'.",
        "Could you code {fn}(s)? Every '{a}' of s should become a '{b}'; all other "
        "characters stay the same.",
        "Given a string s, {fn} returns the string obtained by writing '{b}' "
        "in place of each '{a}'.",
        "We want {fn}(s) to map the character '{a}' to '{b}' throughout s "
        "and return the new string.",
        "Return value of {fn}(s): a copy of s in which '{a}' is replaced everywhere by '{b}'.",
    ), {"fn": "fn", "a": "letter", "b": "letter"}),
    "starts_with": ((
        "Write a Python function {fn}(words) that returns the words in the list words "
        "that start with '{c}'.",
        "Define {fn}(words): keep only the strings of words beginning with '{c}'.",
        "Implement {fn}(words). It returns the items of words whose first letter is '{c}'.",
        "Create a function {fn}(words) that filters words to those starting with '{c}'.",
        "I need {fn}(words), which returns every word in words that begins with '{c}'.",
        "Write {fn}(words) to select the words of the list that start with the letter '{c}'.",
        "Please write {fn}(words) to return, in order, the words of the list "
        "words beginning with '{c}'.",
        "{fn}(words) -> list of the strings in words whose first character is '{c}'.",
        "Can you code {fn}(words)? It should discard every word not starting with "
        "'{c}' and return the rest.",
        "Given a list of strings words, {fn} returns those that have '{c}' "
        "as their initial letter.",
        "Our code is missing a function {fn}(words): it should pick out the entries of words "
        "that open with the letter '{c}'.",
        "Output of {fn}(words): the sublist of words starting with '{c}', keeping their order.",
    ), {"fn": "fn", "c": "letter"}),
    "join_with": ((
        "Write a Python function {fn}(words) that joins the strings in words with '{sep}' "
        "between them.",
        "Define {fn}(words): return the strings of words glued together by '{sep}'.",
        "Implement {fn}(words). It returns one string: the words separated by '{sep}'.",
        "Create a function {fn}(words) that concatenates words using '{sep}' as separator.",
        "I need {fn}(words), which puts '{sep}' between consecutive words and returns it.",
        "Write {fn}(words) to combine the list into a single '{sep}'-separated string.",
        "Please implement {fn}(words) returning the strings of words joined by '{sep}'.",
        "{fn}(words) -> str: the items of words with '{sep}' in between.",
        "Could you write {fn}(words)? It should link the words together, inserting "
        "'{sep}' between neighbours.",
        "Given a list of strings words, {fn} returns them concatenated with the separator '{sep}'.",
        "I want {fn}(words) to build one string from words, using '{sep}' as the delimiter.",
        "Return value of {fn}(words): the words in order, delimited by '{sep}' (no "
        "leading or trailing '{sep}').",
    ), {"fn": "fn", "sep": "sep"}),
    "long_words": ((
        "Write a Python function {fn}(s) that returns the number of words in s longer "
        "than {k} characters.",
        "Define {fn}(s): count the space-separated words of s with more than {k} letters.",
        "Implement {fn}(s). It returns how many words of s have length above {k}.",
        "Create a function {fn}(s) that counts the words in s whose length exceeds {k}.",
        "I need {fn}(s), which tells how many words in s are longer than {k} characters.",
        "Write {fn}(s) to count words of s (split on spaces) with over {k} characters.",
        "Make {fn}(s) return how many words of s have more than {k} characters.",
        "{fn}(s) -> int: number of space-separated words in s with length > {k}.",
        "Could you code {fn}(s)? Split s into words and return the count of those "
        "longer than {k} letters.",
        "Given a sentence s, {fn} returns the number of its words whose "
        "length is greater than {k}.",
        "We want {fn}(s) to count the words of s that contain more than {k} characters.",
        "Task: {fn}(s) gives the count of words in s (separated by spaces) "
        "of length {k}+1 or more.",
    ), {"fn": "fn", "k": "small"}),
}

POOLS = {
    "fn": FUNCTION_NAMES,
    "num": tuple(range(2, 32)),
    "small": tuple(range(1, 11)),
    "letter": LETTERS,
    "sep": SEPARATORS,
}


def _build(spec: Spec):
    def build(values, rng: random.Random):
        v = dict(values)
        inputs = spec.inputs(v, rng)
        expected = [json.dumps(spec.oracle(v, *args)) for args in inputs]
        code = f"def {v['fn']}({spec.params}):\n    return {spec.body.format(**v)}\n"
        return code, {"function": v["fn"], "inputs": inputs, "expected": expected}

    return build


INTENTS = tuple(
    Intent(name, templates, slots, _build(SPECS[name]))
    for name, (templates, slots) in TEMPLATES.items()
)


_CODE_START = re.compile(r"^(def|import|from|class|@)\b", re.M)


def extract_code(text: str) -> str:
    """The code of the reply: the first fenced block, else the text from its first
    line that starts a definition or an import."""
    body = strip_fences(text)
    m = _CODE_START.search(body)
    return body[m.start():] if m else body


class PythonTask(TemplateTask):
    """Python functions from descriptions; see the module docstring for scoring."""

    name = "python"
    system = SYSTEM
    intents = INTENTS
    pools = POOLS

    def __init__(self, seed: int = 0, sizes=None, limits: SandboxLimits = SandboxLimits()):
        super().__init__(seed, sizes)
        self.limits = limits

    def extract(self, text: str) -> str:
        return extract_code(text)

    def score(self, prediction: str, example: Example) -> float:
        g = example.grading
        result = run_function(self.extract(prediction), g["function"], g["inputs"], self.limits)
        if result.status != "ok" or len(result.outputs) != len(g["expected"]):
            return 0.0
        for out, want in zip(result.outputs, g["expected"]):
            if "value" not in out or not same_value(json.loads(out["value"]), json.loads(want)):
                return 0.0
        return 1.0
