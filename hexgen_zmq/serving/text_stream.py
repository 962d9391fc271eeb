"""Turning a stream of token ids into a stream of text, as an HTTP client sees it: incremental detokenization
that never emits half a character, and stop strings matched on the text across token boundaries.

Plain classes over a `decode(ids) -> str` callable, so they are tested without sockets or a model, and the
gateway runs one of each per request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"  # what a decoder writes for the bytes of a character it has only part of


class IncrementalDetokenizer:
    """Text of a growing token list, emitted piece by piece.

    Decodes only a short window: the tokens since the last emission plus those of the emission before, and
    emits what the window adds beyond its older part. Decoding the older part along with the new tokens
    keeps what tokenizers do at a sequence's start (SentencePiece drops a leading space) from showing up
    mid-text. While the window's text ends in U+FFFD a character is split across tokens, so nothing is
    emitted until the next token completes it (or the stream ends: then it is emitted as the decoder
    writes it, as a full decode would). The pieces joined equal `decode(all tokens)` for byte-level and
    SentencePiece tokenizers (checked in tests/test_gateway.py); the one exception is a run of byte tokens
    that is no UTF-8 under SentencePiece's byte fallback, which marks the whole run, not byte by byte."""

    def __init__(self, decode: Callable[[list[int]], str], decode_one: Callable[[int], str] | None = None):
        self._decode = decode
        self._decode_one = decode_one  # decode([token]), maybe cached: the older part is often one token
        self.tokens: list[int] = []
        self._prefix = 0  # window start: the first token of the previous emission
        self._read = 0  # tokens before this were emitted

    def push(self, tokens: Sequence[int]) -> str:
        """Add tokens; return the text they complete (maybe empty)."""
        self.tokens.extend(tokens)
        return self._emit(final=False)

    def finish(self) -> str:
        """The text still held back (an incomplete character at the very end)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read == len(self.tokens):
            return ""
        held = self._read - self._prefix
        if held == 1 and self._decode_one is not None:
            before = self._decode_one(self.tokens[self._prefix])
        else:
            before = self._decode(self.tokens[self._prefix:self._read]) if held else ""
        text = self._decode(self.tokens[self._prefix:])
        if not final and (len(text) <= len(before) or text.endswith(REPLACEMENT)):
            return ""  # nothing visible yet, or a character still incomplete
        self._prefix, self._read = self._read, len(self.tokens)
        return text[len(before):]


class StopMatcher:
    """Cuts text at the first occurrence of any stop string, as OpenAI does: the stop string and everything
    after it are left out.

    Text that could be the start of a stop string is held back until later text decides it: `feed` returns
    only what can no longer become part of a match, so streamed pieces never have to be taken back."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add text; return what is safe to emit. Sets `stopped` once a stop string has appeared."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buffer = self._held + text
        cut = min((i for i in (buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._held = True, ""
            return buffer[:cut]
        keep = self._partial_suffix(buffer)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep]

    def flush(self) -> str:
        """At the end of the stream: what was held back is plain text after all."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest end of `buffer` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:n]):
                    longest = n
                    break
        return longest


class CompletionText:
    """The text of one completion as it streams: detokenized incrementally, then cut at the stop strings."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = (),
                 decode_one: Callable[[int], str] | None = None):
        self.detokenizer = IncrementalDetokenizer(decode, decode_one)
        self.matcher = StopMatcher(stops)
        self.decoded_chars = 0  # characters decoded so far, before stop strings cut (for logprobs' text_offset)

    @property
    def has_stops(self) -> bool:
        return bool(self.matcher.stops)

    @property
    def stopped(self) -> bool:
        """A stop string appeared: the request should end here, with finish_reason "stop"."""
        return self.matcher.stopped

    def push(self, tokens: Sequence[int]) -> str:
        text = self.detokenizer.push(tokens)
        self.decoded_chars += len(text)
        return self.matcher.feed(text)

    def finish(self) -> str:
        """What is left once no more tokens come."""
        text = self.detokenizer.finish()
        self.decoded_chars += len(text)
        return self.matcher.feed(text) + self.matcher.flush()


def finish_reason(broker_reason: str | None) -> str:
    """OpenAI's finish_reason for the broker's: eos and stop tokens are "stop", the token limit "length"."""
    return "length" if broker_reason == "length" else "stop"
