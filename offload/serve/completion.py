"""One generation as text, the way an API client expects it: cut before the first stop string (never
sending any of it, also when it spans tokens), stoppable between two tokens, with its finish reason and
token counts at the end."""

from __future__ import annotations

from typing import Callable, Iterator

from ..generate import Sampling
from ..runtime import Runtime
from ..tokenizer import StreamDecoder


class StopText:
    """Streamed text cut before the first of some stop strings. A piece whose end might be the start of a
    stop string is held back until the next piece says whether it is; `flush` sends what is held at the end.

    Held text never contains a whole stop string, and what was sent never ends with the start of one, so
    the earliest stop string is always found within held text + the new piece."""

    def __init__(self, stops: list[str] = ()):
        if any(not s for s in stops):
            raise ValueError("a stop string is empty")
        self.stops = list(stops)
        self.held = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """The text that can be sent now that `piece` came."""
        if self.stopped:
            return ""
        text = self.held + piece
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.held, self.stopped = "", True
            return text[:min(cuts)]
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1))
                    if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> str:
        rest, self.held = self.held, ""
        return rest


class Completion:
    """A generation from prompt ids on `rt`, continuing from what its KV cache holds (prefix reuse). Iterate
    `pieces()` for the text; afterwards `finish_reason` ("stop": end-of-sequence or a stop string; "length":
    max_tokens; "cancelled"), `completion_tokens` and `stats` (the runtime's, for this generation) say how
    it ended."""

    def __init__(self, rt: Runtime, prompt_ids: list[int], max_tokens: int, sampling: Sampling = Sampling(),
                 stop: list[str] = ()):
        self.rt, self.prompt_ids, self.max_tokens, self.sampling = rt, prompt_ids, max_tokens, sampling
        self.stop = StopText(stop)
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.stats: dict = {}

    def pieces(self, cancelled: Callable[[], bool] = lambda: False) -> Iterator[str]:
        """Text pieces as tokens come. `cancelled()` is asked after each token, before the next step runs:
        a cancelled generation ends within one token."""
        tokens = self.rt.generate_ids(self.prompt_ids, self.max_tokens, self.sampling, reuse_prefix=True)
        decoder = StreamDecoder(self.rt.tokenizer, self.prompt_ids)
        try:
            for token in tokens:
                self.completion_tokens += 1
                text = self.stop.push(decoder.push(token))
                if text:
                    yield text
                if self.stop.stopped:
                    self.finish_reason = "stop"
                    return
                if cancelled():
                    self.finish_reason = "cancelled"
                    return
            # Fewer tokens than asked for: the model chose end-of-sequence.
            self.finish_reason = "length" if self.completion_tokens == self.max_tokens else "stop"
            rest = self.stop.flush()
            if rest:
                yield rest
        finally:
            # Ends the runtime's generation now (not when the iterator is collected), so its statistics are
            # final here and the KV cache is free for the next one.
            tokens.close()
            self.stats = self.rt.stats()
