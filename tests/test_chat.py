"""`moe-offload chat` (offload/serve/chat.py): turns through the chat template with the history kept in the
KV cache, answers equal to a cold run's; driven through a pipe (one message a line) and through a
pseudo-terminal (streamed answer, Ctrl-C mid-answer, /stats, /reset, /exit)."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

import offload
from conftest import REPO
from offload.serve.chat import Conversation

ENV = os.environ | {"OMP_NUM_THREADS": "1"}  # the chat and its reference do the same arithmetic
FIRST, SECOND = "The for statement", "Lists are mutable"


@pytest.fixture(scope="module")
def rt():
    with offload.load("demo", context=256) as runtime:
        yield runtime


def test_a_second_turn_prefills_only_what_follows_the_first_and_answers_as_a_cold_run(rt):
    talk = Conversation(rt, max_new_tokens=8)
    first = "".join(talk.reply(FIRST))
    first_prompt = rt.stats()["prompt_tokens"]
    assert talk.messages == [{"role": "user", "content": FIRST}, {"role": "assistant", "content": first}]
    history, cached = list(talk.messages), list(rt.cached.ids)
    second = "".join(talk.reply(SECOND))
    s = rt.stats()
    ids = rt.encode_messages(history + [{"role": "user", "content": SECOND}])
    assert s["prompt_tokens"] == len(ids)
    # At least the whole first prompt came from the cache: what follows it is the re-rendered answer and the
    # new message (this template writes the answer back with a space before it, which the cache lacks).
    assert first_prompt <= s["prompt_tokens_reused"] < len(ids)
    assert s["prompt_tokens_reused"] == next(i for i, (a, b) in enumerate(zip(cached, ids)) if a != b)
    cold = Conversation(rt, max_new_tokens=8)
    cold.messages = history
    rt.cached.ids.clear()  # nothing to reuse: a cold run of the same conversation
    assert "".join(cold.reply(SECOND)) == second and rt.stats()["prompt_tokens_reused"] == 0


def test_reset_forgets_the_conversation(rt):
    talk = Conversation(rt, max_new_tokens=4, system="Answer briefly.")
    "".join(talk.reply(FIRST))
    talk.reset()
    assert talk.messages == [{"role": "system", "content": "Answer briefly."}]


def test_a_conversation_longer_than_the_context_is_refused_and_kept(rt):
    talk = Conversation(rt, max_new_tokens=4)
    with pytest.raises(offload.UserError, match="more than the context holds"):
        "".join(talk.reply("word " * 300))
    assert talk.messages == []


def test_piped_stdin_is_one_message_a_line():
    ref = subprocess.run([sys.executable, "-m", "cli.main", "generate", "demo", FIRST, "--chat", "-n", "6", "--json",
                          "--context", "256"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    messages = f"{FIRST}\n\n/stats\n{SECOND}\n/stats\n/reset\n/nonsense\n/exit\nnever read\n"
    out = subprocess.run([sys.executable, "-m", "cli.main", "chat", "demo", "-n", "6", "--context", "256"],
                         input=messages, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(json.loads(ref.stdout)["text"] + "\n")
    reused = [int(n) for n in re.findall(r"^prompt_tokens_reused: (\d+)$", out.stdout, re.M)]
    prompts = [int(n) for n in re.findall(r"^prompt_tokens: (\d+)$", out.stdout, re.M)]
    assert len(reused) == 2 and reused[1] >= prompts[0]  # the second message reused the first turn
    assert "(the conversation is forgotten)" in out.stderr and "unknown command /nonsense" in out.stderr
    assert "Traceback" not in out.stderr


class Terminal:
    """A child process on a pseudo-terminal: what it writes, read as it comes; keys sent as typed."""

    def __init__(self, *args: str):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal, so Ctrl-C there is SIGINT here
            os.chdir(REPO)
            os.execve(sys.executable, [sys.executable, "-m", "cli.main", *args], ENV | {"TERM": "dumb"})
        self.seen = ""

    def expect(self, pattern: str, timeout: float = 120) -> re.Match:
        """Read until `pattern` matches what came after the previous match."""
        deadline = time.monotonic() + timeout
        while not (found := re.search(pattern, self.seen)):
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} in {self.seen[-2000:]!r}"
            if select.select([self.fd], [], [], left)[0]:
                try:
                    self.seen += os.read(self.fd, 4096).decode(errors="replace")
                except OSError:  # the child closed the terminal
                    assert re.search(pattern, self.seen), f"no {pattern!r} in {self.seen[-2000:]!r}"
        self.seen = self.seen[found.end():]
        return found

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:  # keep the terminal drained so the child never blocks writing to it
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.seen += os.read(self.fd, 4096).decode(errors="replace")
            except OSError:
                pass
        raise AssertionError(f"the chat did not exit: {self.seen[-2000:]!r}")

    def close(self) -> None:
        try:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


def test_chat_on_a_terminal_streams_and_ctrl_c_stops_the_answer_not_the_program():
    term = Terminal("chat", "demo", "-n", "200", "--context", "256", "--threads", "1")
    try:
        term.expect(r"/reset forgets the conversation")
        term.expect(r"> ")
        term.send(FIRST + "\r")
        term.expect(re.escape(FIRST) + r"\r?\n")  # the terminal's echo of the line
        term.expect(r"\S{3,}")  # the answer has begun to stream
        term.send("\x03")  # Ctrl-C, as the terminal sends it
        term.expect(r"\[stopped\]")
        term.expect(r"> ")
        term.send("/stats\r")
        stopped_at = int(term.expect(r"new_tokens: (\d+)")[1])
        assert 1 <= stopped_at < 200  # stopped long before its 200 tokens
        term.expect(r"> ")
        term.send("/reset\r")
        term.expect(r"\(the conversation is forgotten\)")
        term.expect(r"> ")
        term.send("/exit\r")
        assert term.wait() == 0
        assert "Traceback" not in term.seen
    finally:
        term.close()
