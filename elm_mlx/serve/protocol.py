"""OpenAI request bodies (pydantic models, strict types) and the error every failure becomes.

Field names, ranges and defaults follow OpenAI's API reference; `top_k`, `min_p`
and `repetition_penalty` are extensions (as in mlx-lm and vLLM). Unknown fields
are ignored, as most OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class ApiError(Exception):
    """An error response: HTTP status and OpenAI's `{"error": {...}}` body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}

# OpenAI fields this server does not implement: refused rather than silently ignored.
_UNSUPPORTED = {
    "tools": "tool calls",
    "tool_choice": "tool calls",
    "functions": "function calls",
    "function_call": "function calls",
    "suffix": "suffixes (fill-in-the-middle)",
    "audio": "audio output",
    "prediction": "predicted outputs",
}


def check_supported(data) -> None:
    """Raise a 400 naming the first OpenAI field in `data` that this server cannot honour."""
    if not isinstance(data, dict):
        return
    for name, what in _UNSUPPORTED.items():
        if data.get(name) not in (None, [], {}, ""):
            raise ApiError(400, f"{name}: {what} are not supported by this server", param=name)
    fmt = data.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise ApiError(
            400, 'response_format: only {"type": "text"} is supported', param="response_format"
        )
    best_of = data.get("best_of")
    if best_of is not None and best_of != 1:
        raise ApiError(400, f"best_of must be 1, got {best_of!r}", param="best_of")


def validation_error(e: ValidationError) -> ApiError:
    """The first problem pydantic found, as a 400 naming the field."""
    err = e.errors()[0]
    parts = [str(p) for p in err["loc"] if not _type_tag(p)]
    param = ".".join(parts) or None
    message = err["msg"]
    if err["type"] == "missing":
        message = "this field is required"
    elif err["type"] == "model_type" and not parts:
        message = "the request body must be a JSON object"
    message = f"{param}: {message}" if param else message
    return ApiError(400, message, param=param, code="invalid_value")


def _type_tag(part) -> bool:
    """pydantic names the union member in an error's location (`stop.str`); not a field."""
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part)


class _Body(BaseModel):
    """A JSON object of a request: strict types, unknown fields ignored, and a field sent as
    null taken as left out, as in OpenAI's API (clients send `"n": null` or `"stream":
    null` for what they do not set)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data):
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class _Request(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, lt=1)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, ge=0.01, le=10)  # smaller overflows logits
    logit_bias: dict[str, float] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 16:
            raise ValueError(f"at most 16 stop strings, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        for key, value in (v or {}).items():
            if not (key.isascii() and key.isdigit()):  # "²" is a digit to str.isdigit
                raise ValueError(f"keys must be token ids (strings of digits), got {key[:40]!r}")
            if len(key) > 18:
                raise ValueError(f"token id {key[:18]}... is beyond any vocabulary")
            if not -100 <= value <= 100:
                raise ValueError(f"values must be in [-100, 100], got {value} for {key}")
        return v

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("the prompt is empty")
        if isinstance(v, list) and isinstance(v[0], str):
            if len(v) > 1:
                raise ValueError("one prompt per request: send a string or a list of token ids")
            return v[0]
        if isinstance(v, list) and any(i < 0 for i in v):
            raise ValueError("token ids must be >= 0")
        return v


_Request.model_rebuild()
ChatRequest.model_rebuild()
CompletionRequest.model_rebuild()
