"""Streaming token ids -> text without broken UTF-8, and stop-string matching.

IncrementalDetokenizer uses the prefix-offset / read-offset technique of vLLM and
TGI: decode a short window that starts a few tokens before the text already sent,
and send only what the new tokens added. Decoding whole windows, never single
tokens, keeps the leading spaces of SentencePiece/BPE tokens and multi-byte
characters split across byte-level tokens right.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as decoding context, so the first generated token's leading
# space comes out as it would in the middle of the text (vLLM uses 5 as well).
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns generated token ids into text, one token at a time.

    Contract: with no prompt, "".join(push(t) for t in ids) + flush() equals
    tokenizer.decode(ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)
    for byte-level BPE tokenizers and for whole-character sequences of the others.
    With prompt_ids, the text continues the prompt's: a leading space a decoder strips
    at the start of a text is kept. Text that ends in U+FFFD (an incomplete UTF-8
    sequence) is held back until a later token completes it or flush() is called.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: list[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # _ids: the window, tokens from prefix_offset on; _read: tokens of it whose
        # text was already emitted (or belongs to the prompt).
        self._ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:]) if prompt_ids else []
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)  # decode(_ids[:_read])
        self._emitted: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._emitted)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it finished (possibly "")."""
        self._ids.append(token_id)
        window = self._decode(self._ids)
        if window.endswith(REPLACEMENT_CHAR) or len(window) <= len(self._prefix_text):
            return ""
        return self._emit(window)

    def flush(self) -> str:
        """Return whatever is held back, even an incomplete UTF-8 sequence."""
        window = self._decode(self._ids)
        if len(window) <= len(self._prefix_text):
            return ""
        return self._emit(window)

    def _emit(self, window: str) -> str:
        new_text = window[len(self._prefix_text) :]
        # The tokens just emitted become the next window's prefix.
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        self._emitted.append(new_text)
        return new_text

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        # Cleanup (" ." -> ".") looks across token boundaries, so it cannot be
        # applied to windows consistently; it stays off.
        return self._tokenizer.decode(
            ids,
            skip_special_tokens=self._skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )


class StopMatcher:
    """Cuts streamed text at the first stop string.

    Contract: the concatenation of everything returned (feed texts, then flush when
    not stopped) is the input up to the first occurrence of any stop string, where
    "first" means the one that completes earliest (ties: the longer one). The result
    does not depend on how the input is split into feeds. Only a suffix that could
    still grow into a stop string is held back.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self._stops = stops
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit now, stopped). After a stop, returns ("", True)."""
        if self._stopped:
            return "", True
        if not self._stops:
            return text, False
        buf = self._held + text
        end = self._first_match_start(buf)
        if end is not None:
            self._stopped = True
            self._held = ""
            return buf[:end], True
        keep = self._partial_suffix_start(buf)
        self._held = buf[keep:]
        return buf[:keep], False

    def flush(self) -> str:
        """Held-back text, when generation ends for another reason."""
        held, self._held = self._held, ""
        return held

    def _first_match_start(self, buf: str) -> int | None:
        """Start of the stop occurrence that ends earliest in buf, or None."""
        best: tuple[int, int] | None = None  # (end, start)
        for stop in self._stops:
            start = buf.find(stop)
            if start >= 0:
                cand = (start + len(stop), start)
                if best is None or cand < best:
                    best = cand
        return None if best is None else best[1]

    def _partial_suffix_start(self, buf: str) -> int:
        """Start of the longest suffix of buf that is a proper prefix of a stop."""
        keep = len(buf)
        for stop in self._stops:
            i = max(len(buf) - len(stop) + 1, 0)
            # Only positions holding stop[0] can begin a partial match.
            while (i := buf.find(stop[0], i, keep)) >= 0:
                if stop.startswith(buf[i:]):
                    keep = i
                    break
                i += 1
        return keep
