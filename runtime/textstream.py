"""Token ids -> text for streaming: incremental detokenisation and stop strings, in bounded work per token.

`TextStream` turns generated ids into text deltas as `tokenizers.decoders.DecodeStream` does (decoding only the few
ids since the last character it gave out, never the whole answer), and `StopMatcher` finds stop strings in text that
arrives in pieces, holding back only a tail that could still become a stop. Per token the work depends on the token
and on the stop strings' lengths, never on how long the answer already is: the server runs this on its event loop,
and `medc run` prints through it too.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

MAX_PENDING = 8  # ids that decode to no complete character: past this they are invalid UTF-8 bytes, given out as is


class StopMatcher:
    """The first occurrence of any of a few stop strings in text fed piece by piece (Knuth-Morris-Pratt, one
    automaton per stop string). `feed` gives back the text that is safe to show: everything but a tail that is
    the start of a stop string (at most the longest stop's length - 1 characters), or the text up to a stop."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.fail = [_failure(s) for s in self.stops]
        self.state = [0] * len(self.stops)  # per stop: the longest tail of the text so far that begins it
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """-> (text to give out, whether a stop string was reached: then nothing after it is given out, ever)."""
        if not self.stops:
            return piece, False
        buf = self.held + piece
        cut = None
        for k, stop in enumerate(self.stops):
            q, fail, n = self.state[k], self.fail[k], len(stop)
            for j, c in enumerate(piece):
                while q and stop[q] != c:
                    q = fail[q]
                if stop[q] == c:
                    q += 1
                if q == n:  # ends at piece[j]; it began inside the held tail or this piece
                    start = len(self.held) + j + 1 - n
                    cut = start if cut is None else min(cut, start)
                    break
            self.state[k] = q
        if cut is not None:  # the earliest stop that completed in this piece, as a search of the whole text finds it
            self.stops, self.held = [], ""
            return buf[:cut], True
        hold = max(self.state)
        self.held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        """The held tail, at the end of the text (it never became a stop)."""
        held, self.held = self.held, ""
        return held


def _failure(s: str) -> list[int]:
    """KMP's failure function: fail[q] = the longest proper prefix of s[:q] that is also its suffix."""
    fail, k = [0] * (len(s) + 1), 0
    for q in range(1, len(s)):
        while k and s[q] != s[k]:
            k = fail[k]
        if s[q] == s[k]:
            k += 1
        fail[q + 1] = k
    return fail


_SPECIALS: dict[int, tuple[object, frozenset]] = {}  # id(tokenizer) -> (tokenizer, its special token ids)


def special_ids(tokenizer) -> frozenset:
    """Ids that `decode(..., skip_special_tokens=True)` drops (read once per tokenizer)."""
    hit = _SPECIALS.get(id(tokenizer))
    if hit is None or hit[0] is not tokenizer:
        hit = _SPECIALS[id(tokenizer)] = (tokenizer, frozenset(
            i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special))
    return hit[1]


class TextStream:
    """Generated ids (a `tokenizers.Tokenizer`'s) -> text deltas, special tokens skipped, equal to decoding all the
    ids at once. Holds back an incomplete UTF-8 character (byte-fallback tokens) and any tail that could be the start
    of a stop string, so no client ever sees text past a stop.

    Where whole decoding is not local, this gives out what it already showed: Hugging Face's ByteFallback decoder turns
    a run of byte tokens into one U+FFFD per byte when any of it is invalid UTF-8, even characters of that run shown
    earlier; and a run that stays invalid is given out after MAX_PENDING ids rather than re-decoded on every token."""

    def __init__(self, tokenizer, stop: list[str] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = []  # every generated id (usage counts them)
        self._stream = DecodeStream(skip_special_tokens=True)
        self._skip = special_ids(tokenizer)
        self._stops = StopMatcher(list(stop))
        self._pending: list[int] = []  # ids the decode stream holds: no complete character yet
        self._pending_at = 0  # where the first of them is in self.ids
        self.stopped = False

    def push(self, token: int) -> tuple[str, bool]:
        """-> (new text, whether a stop string was reached)."""
        self.ids.append(token)
        if self.stopped or token in self._skip:
            return "", self.stopped
        if not self._pending:
            self._pending_at = len(self.ids) - 1
        self._pending.append(token)
        try:
            piece = self._stream.step(self.tokenizer, token)
        except Exception:  # noqa: BLE001 - tokenizers' "invalid prefix": a byte run turned invalid after it was shown
            piece = self._restart()
        else:
            if piece is not None:
                self._pending = []
            elif len(self._pending) >= MAX_PENDING:
                piece = self._restart()
        if piece is None:
            return "", False
        text, self.stopped = self._stops.feed(piece)
        return text, self.stopped

    def flush(self) -> tuple[str, bool]:
        """At the end: what is still held (an incomplete character, a possible stop's start) -> (text, stopped)."""
        if self.stopped:
            return "", True
        text, stopped = self._stops.feed(self._decode_pending()) if self._pending else ("", False)
        self._pending = []
        if stopped:
            self.stopped = True
            return text, True
        return text + self._stops.flush(), False

    def _restart(self) -> str:
        """The pending ids decoded as they stand, and a fresh decode stream that starts after them."""
        piece = self._decode_pending()
        self._pending = []
        primer = self._clean(len(self.ids))
        self._stream = DecodeStream(ids=None if primer is None else [primer], skip_special_tokens=True)
        return piece

    def _decode_pending(self) -> str:
        """The pending ids decoded as they follow the text before them (a decoder may treat the first token apart:
        Metaspace drops its leading space)."""
        decode = self.tokenizer.decode
        context = self._clean(self._pending_at)
        if context is None:
            return decode(self._pending, skip_special_tokens=True)
        prefix = decode([context], skip_special_tokens=True)
        text = decode([context, *self._pending], skip_special_tokens=True)
        return text[len(prefix):] if text.startswith(prefix) else decode(self._pending, skip_special_tokens=True)

    def _clean(self, end: int) -> int | None:
        """The newest id before self.ids[end] that decodes to whole characters on its own (a context to decode after;
        a byte token is not one), looking back a few ids at most."""
        for i in range(end - 1, max(-1, end - 2 * MAX_PENDING - 1), -1):
            t = self.ids[i]
            if t not in self._skip and not self.tokenizer.decode([t], skip_special_tokens=True).endswith("\ufffd"):
                return t
        return None
