"""The OpenAI request bodies the server takes, validated by pydantic: JSON types taken strictly
(a string is not a number), ranges checked, unknown fields refused, and the OpenAI fields this
server does not implement (n > 1, logprobs, penalties, tools...) refused by name rather than
ignored. Defaults are OpenAI's (temperature 1, max_tokens 16 for completions)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from sparsefit.runtime.config import MAX_NEW_TOKENS

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _refuse_if_set(value: object, info: ValidationInfo) -> object:
    """An OpenAI field this server does not do: fine when absent or falsy, else the field is named."""
    if value:
        raise ValueError(f"{info.field_name} is not supported by this server; leave it out")
    return value


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False


class _Generation(BaseModel):
    """The fields completions and chat share."""

    model_config = _STRICT

    model: str = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1 << 20)  # an extension (vLLM's): 0 keeps every token
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # an extension (vLLM's): generate exactly max_tokens
    user: str | None = None  # an end-user id: accepted, unused
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 16 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("give at most 16 stop strings, each 1 to 256 characters")
        return stops

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported; send one request per completion")
        return value

    @field_validator("presence_penalty", "frequency_penalty", "logit_bias")
    @classmethod
    def _no_penalties(cls, value: object, info: ValidationInfo) -> object:
        return _refuse_if_set(value, info)


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int]
    max_tokens: int = Field(16, ge=1, le=MAX_NEW_TOKENS)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str] | list[int]) -> str | list[int]:
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError("send one prompt per request (a list of prompts is not supported)")
            return value[0]
        if isinstance(value, list) and not value:
            raise ValueError("the prompt is empty")
        return value

    @field_validator("echo", "logprobs", "suffix")
    @classmethod
    def _unsupported(cls, value: object, info: ValidationInfo) -> object:
        return _refuse_if_set(value, info)

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only best_of=1 is supported; leave it out")
        return value


class TextPart(BaseModel):
    model_config = _STRICT

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)  # default: the rest of the context
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)  # the newer name of max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None

    @field_validator("logprobs", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls", "response_format")
    @classmethod
    def _unsupported(cls, value: object, info: ValidationInfo) -> object:
        return _refuse_if_set(value, info)

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:  # fmt: skip
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def describe_errors(errors: list[dict]) -> tuple[str, str | None]:
    """One message and the field to blame from pydantic's (or FastAPI's) error list."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON ({detail}); send a JSON object", None
    # a union's error names the member type (prompt.str, prompt.list[int].0): keep the request's own path
    path = [x for x in loc if not (x[:1].isalpha() and ("[" in x or x in ("str", "int", "float", "bool")))]
    param = ".".join(path) or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "model_attributes_type" and not path:
        return "the request body must be a JSON object", None
    if first.get("type") == "extra_forbidden":
        message = "unknown field (not an OpenAI field this server takes); check its spelling or leave it out"
    return (f"{param}: {message}" if param else message), param
