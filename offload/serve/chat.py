"""`moe-offload chat`: talk to a model in the terminal. Each turn renders the whole conversation with the
model's chat template; the KV cache still holds the earlier turns from the generation before, so only the
tokens after them are prefilled (prefix reuse). Ctrl-C stops the answer being written, not the program.

    /reset   forget the conversation        /stats   the last answer's runtime statistics
    /exit    leave (Ctrl-D too)

A stdin that is not a terminal (a pipe, a file) is read one message a line, each answer written as it comes."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable, Iterator, TextIO

from quant.errors import UserError

from ..generate import Sampling
from ..runtime import Runtime, load
from .completion import Completion

HELP = "/reset forgets the conversation, /stats shows the last answer's statistics, /exit leaves; " \
       "Ctrl-C stops an answer"


class Conversation:
    """The messages so far and the runtime that answers them; the runtime's KV cache holds their tokens."""

    def __init__(self, rt: Runtime, max_new_tokens: int = 256, sampling: Sampling = Sampling(),
                 system: str | None = None):
        self.rt, self.max_new_tokens, self.sampling, self.system = rt, max_new_tokens, sampling, system
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text: str, stopped: Callable[[], bool] = lambda: False) -> Iterator[str]:
        """The answer to `text`, piece by piece; it joins the conversation when it ends (stopped or not)."""
        messages = self.messages + [{"role": "user", "content": text}]
        ids = self.rt.encode_messages(messages)
        room = self.rt.model.max_seq - len(ids) + 1  # the last new token needs no position of its own
        if room < 1:
            raise UserError(f"the conversation is {len(ids)} tokens, more than the context holds "
                            f"({self.rt.model.max_seq}): /reset to start over, or a larger --context")
        completion = Completion(self.rt, ids, min(self.max_new_tokens, room), self.sampling)
        pieces = []
        for piece in completion.pieces(stopped):
            pieces.append(piece)
            yield piece
        self.messages = messages + [{"role": "assistant", "content": "".join(pieces)}]

    def stats(self) -> dict:
        return self.rt.stats()


class StopOnInterrupt:
    """While an answer is written, Ctrl-C (SIGINT) asks it to stop after the current token instead of
    raising KeyboardInterrupt wherever the main thread happens to be: in the middle of the expert store's
    bookkeeping, a raised exception could leave its slot table half-updated. A second Ctrl-C in the same
    answer (a long prefill that does not reach the next token) interrupts as usual."""

    def __init__(self):
        self.event = threading.Event()
        self.previous = None

    def __enter__(self) -> "StopOnInterrupt":
        self.event.clear()
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def chat(model: str | os.PathLike | None = "demo", *, max_new_tokens: int = 256, sampling: Sampling = Sampling(),
         system: str | None = None, threads: int | None = None, stdin: TextIO | None = None,
         write: Callable[[str], None] | None = None, note: Callable[[str], None] | None = None, progress=None,
         **load_options) -> None:
    """Load `model` and chat with it on `stdin` until /exit or end of input. `write` takes the conversation
    (the answers, /stats), `note` one-line remarks (help, '[stopped]', a refused message). Other options go
    to `offload.load`."""
    stdin = stdin or sys.stdin
    write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    note = note or (lambda text: print(text, file=sys.stderr, flush=True))
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    with load(model, progress=progress, threads=threads, **load_options) as rt:
        talk = Conversation(rt, max_new_tokens, sampling, system)
        # A model without a chat template, or one whose template refuses a system message: one line now.
        rt.encode_messages(talk.messages + [{"role": "user", "content": "hello"}])
        interactive = stdin is sys.stdin and stdin.isatty()  # input() reads sys.stdin, with line editing
        if interactive:
            import readline  # noqa: F401  line editing and history for input()

            note(f"chatting with {rt.ckpt.path.name}: {HELP}")
        interrupt = StopOnInterrupt()
        while (line := _read(stdin, interactive, note)) is not None:
            text = line.strip()
            if not text:
                continue
            if text == "/exit":
                break
            if text == "/reset":
                talk.reset()
                note("(the conversation is forgotten)")
                continue
            if text == "/stats":
                write("".join(f"{key}: {value}\n" for key, value in talk.stats().items()))
                continue
            if text.startswith("/"):
                note(f"unknown command {text.split()[0]}: {HELP}")
                continue
            try:
                with interrupt:
                    for piece in talk.reply(text, interrupt.event.is_set):
                        write(piece)
            except UserError as exc:  # this message cannot be answered; the conversation goes on
                note(f"moe-offload: {exc}")
                continue
            write("\n")
            if interrupt.event.is_set():
                note("[stopped]")


def _read(stdin: TextIO, interactive: bool, note: Callable[[str], None]) -> str | None:
    """The next message; None at the end of input. At a terminal's prompt, Ctrl-C clears the line."""
    if not interactive:
        line = stdin.readline()
        return line if line else None
    while True:
        try:
            return input("> ")
        except EOFError:
            note("")
            return None
        except KeyboardInterrupt:
            note(f"\n({HELP})")
