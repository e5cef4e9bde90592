"""The OpenAI API's request and response bodies that the server speaks, as pydantic models: a request is
validated here (a wrong field is a 400 naming it), a response is built from these and nothing else.

A request field that would change what is generated and that this server does not implement (penalties,
logprobs, tools, n > 1, ...) is refused by name rather than ignored; fields that change nothing here
(`user`, `metadata`, ...) are accepted and ignored, as clients send them routinely."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..generate import SEED_MAX, SEED_MIN

MAX_STOPS = 4  # as OpenAI's API

# field -> the values that mean "not asked for", which are accepted; any other value is refused by name.
UNSUPPORTED = {
    "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "repetition_penalty": (None, 1),
    "logit_bias": (None, {}), "logprobs": (None, False, 0), "top_logprobs": (None, 0),
    "tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []),
    "function_call": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
    "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,),
}


class StreamOptions(BaseModel):
    include_usage: bool = False


class Request(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)  # None: OpenAI's default, 1
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)  # not OpenAI's; llama.cpp's and vLLM's servers take it too
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("a stop string is empty")
        return stops

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        if self.n not in (None, 1):
            raise ValueError(f"n={self.n}: this server generates one choice per request (n=1)")
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
                raise ValueError(f"{name}={value!r} is not supported by this server")
        return self

    @property
    def stops(self) -> list[str]:
        return self.stop or []

    def limit(self) -> int | None:
        """The most tokens to generate the client asked for (None: up to the context)."""
        return self.max_tokens


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # "developer" is OpenAI's newer name for "system"; tool and function messages need tool calls.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content):
        # Said here in one line, instead of pydantic's one error per member of the union.
        if isinstance(content, list):
            kinds = {part.get("type") if isinstance(part, dict) else type(part).__name__ for part in content}
            if kinds - {"text"}:
                raise ValueError(f"only text content parts are supported, got {sorted(map(str, kinds - {'text'}))}")
        elif not isinstance(content, str):
            raise ValueError("content must be a string or a list of text parts")
        return content

    def for_template(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(Request):
    # One prompt: text, a list holding one text, or token ids. Several prompts would be several choices.
    prompt: str | list[str] | list[int]

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise ValueError(f"one prompt per request (got {len(prompt)}): this server generates one choice")
            return prompt[0]
        if isinstance(prompt, list) and not prompt:
            raise ValueError("the prompt is empty")
        if not isinstance(prompt, str) and not (isinstance(prompt, list) and all(type(p) is int for p in prompt)):
            raise ValueError("prompt must be a string, a list of one string, or a list of token ids")
        return prompt


# ---- responses ----------------------------------------------------------------------------------------------

class PromptDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose keys and values were already in the KV cache (prefix reuse)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptDetails


def usage(prompt_tokens: int, completion_tokens: int, reused: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens, prompt_tokens_details=PromptDetails(cached_tokens=reused))


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class TextChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class Response(BaseModel):
    """The envelope of every completion and chunk; `moe_offload`: the runtime's statistics of this
    generation (hits, misses, bytes moved, tokens/s, prompt tokens reused), on the last chunk of a stream."""

    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChoice | ChatChunkChoice | TextChoice]
    usage: Usage | None = None
    moe_offload: dict | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moe-offload"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class Error(BaseModel):
    error: ErrorBody
