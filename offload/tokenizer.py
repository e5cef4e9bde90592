"""The checkpoint's tokenizer (tokenizer.json via the `tokenizers` library), its chat template and
incremental detokenization for streaming."""

from __future__ import annotations

import json
from pathlib import Path

from quant.errors import UserError


class Tokenizer:
    def __init__(self, folder: Path, bos_id: int | None = None, eos_ids: tuple[int, ...] = ()):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{path}: missing (the model folder needs its tokenizer.json)")
        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises its own exception types
            raise UserError(f"{path}: unreadable tokenizer ({str(exc).splitlines()[0]})") from None
        self.folder = Path(folder)
        self.config = _read_json(self.folder / "tokenizer_config.json")
        gen = _read_json(self.folder / "generation_config.json")
        self.bos_id = self._special("bos_token", gen.get("bos_token_id", bos_id))
        eos = gen.get("eos_token_id", list(eos_ids) or None)
        eos = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        eos_tok = self._special("eos_token", None)
        self.eos_ids = set(eos) | ({eos_tok} if eos_tok is not None else set())
        self.add_bos = bool(self.config.get("add_bos_token", True)) and self.bos_id is not None

    def _special(self, key: str, default: int | None) -> int | None:
        value = self.config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and self.tok.token_to_id(value) is not None:
            return self.tok.token_to_id(value)
        return default

    def token(self, key: str) -> str:
        value = self.config.get(key) or ""
        return value.get("content", "") if isinstance(value, dict) else value

    def encode(self, text: str, chat: bool = False) -> list[int]:
        """Prompt text -> ids, with bos prepended (by the chat template when `chat`)."""
        check_utf8(text)
        if chat:
            text = self.apply_chat_template(text)
            ids = self.tok.encode(text, add_special_tokens=False).ids
            return ids  # the template writes bos itself
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if self.add_bos else []) + ids

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """A conversation ([{"role": ..., "content": ...}, ...]) as the chat template writes it, ending where
        the assistant's answer begins, as ids (the template writes bos itself)."""
        for m in messages:
            check_utf8(m["content"])
        return self.tok.encode(self.apply_chat_template(messages), add_special_tokens=False).ids

    def apply_chat_template(self, user_message: str | list[dict]) -> str:
        """The prompt as the model's chat template writes one user turn (or a whole conversation: a list of
        {"role", "content"} messages). The template comes from a model folder, often downloaded: it runs
        sandboxed, as transformers runs it, so it cannot reach Python."""
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template, where = self._chat_template()

        def raise_exception(message):
            raise UserError(f"chat template ({where}): {message}")

        try:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = raise_exception
            return env.from_string(template).render(
                messages=[{"role": "user", "content": user_message}] if isinstance(user_message, str) else user_message,
                add_generation_prompt=True,
                bos_token=self.token("bos_token"), eos_token=self.token("eos_token"))
        except jinja2.TemplateError as exc:  # syntax errors, unknown filters, the sandbox's refusals
            raise UserError(f"chat template ({where}): {type(exc).__name__}: {str(exc).splitlines()[0]}") from None

    def _chat_template(self) -> tuple[str, Path]:
        """The template and the file it came from: tokenizer_config.json, or the chat_template.jinja /
        chat_template.json that newer transformers versions write beside it."""
        template, where = self.config.get("chat_template"), self.folder / "tokenizer_config.json"
        if not template and (self.folder / "chat_template.jinja").is_file():
            where = self.folder / "chat_template.jinja"
            try:
                template = where.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise UserError(f"{where}: unreadable ({exc})") from None
        elif not template and (self.folder / "chat_template.json").is_file():
            where = self.folder / "chat_template.json"
            template = _read_json(where).get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        if not template or not isinstance(template, str):
            raise UserError(f"--chat: this model has no chat template (looked in tokenizer_config.json, "
                            f"chat_template.jinja and chat_template.json in {self.folder})")
        return template, where

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class StreamDecoder:
    """Turns generated ids into text pieces as they arrive, never splitting a multi-byte character.

    Decoding is not prefix-stable: SentencePiece tokenizers (Mixtral's) strip the leading space of whatever
    they decode, so the first generated word would lose its space. Each step decodes the generated ids
    after a few ids of context (the end of the prompt) and emits what the context did not already say."""

    CONTEXT = 4

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] = ()):
        self.tokenizer, self.ids = tokenizer, []
        self.context = list(prompt_ids)[-self.CONTEXT:]
        self.emitted = tokenizer.decode(self.context)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.context + self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece


def check_utf8(prompt: str) -> None:
    """Raise UserError for a prompt that is not valid UTF-8. Such bytes reach Python as lone surrogates
    (sys.argv and a C-locale stdin decode with surrogateescape), which the tokenizers library cannot take."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(f"the prompt is not valid UTF-8 (at character {exc.start}); convert it to UTF-8 "
                        f"(e.g. iconv -t UTF-8)") from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}
