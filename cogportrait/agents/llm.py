"""A small client for OpenAI-compatible chat endpoints that returns validated pydantic answers.

Why not the ``openai`` package: one POST with ``requests`` (already a dependency) is all the agents
need, and owning the loop lets every failure become one decision. The agents' answers are pydantic
models, so the request asks for structured output with the model's own JSON schema
(``response_format = {"type": "json_schema", ...}``, ``strict: false`` because the schemas use
``prefixItems`` and defaults that strict mode refuses). Servers that do not know ``json_schema``
(older llama.cpp and Ollama builds, some proxies) answer 400: the client then switches to JSON mode
(``{"type": "json_object"}``) once and keeps it for the rest of the session. The schema is written
into the system message as well, so that JSON mode, and servers that ignore ``response_format``,
still know the shape to produce.

Every way an answer can fail ends in one of two places:

- retried, up to ``retries`` re-asks: malformed JSON or an answer pydantic (or the caller's
  semantic ``check``) refuses, with the error sent back to the model as a user message so it can
  fix it; HTTP 429 (waiting ``Retry-After`` seconds, capped), 408/409 and 5xx; timeouts and
  refused connections; refusals (``message.refusal`` or ``finish_reason == "content_filter"``);
- given up on at once: other 4xx answers (a wrong key, URL or model name does not heal by asking
  again).

Either way the caller gets :class:`BackendUnavailable` whose message says why and after how many
attempts, so the compiler can fall back to the ``rules`` backend with a warning that says why.

The API key only ever travels in the ``Authorization`` header: it is not in any log line,
exception or ``repr``, and any text echoed by the server is scrubbed of it before being reported.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import requests
from pydantic import BaseModel, ValidationError

from cogportrait.agents.backends import BackendUnavailable
from cogportrait.config import OpenAIConfig

log = logging.getLogger("cogportrait.agents.llm")

M = TypeVar("M", bound=BaseModel)

ENV_BASE_URL = "OPENAI_BASE_URL"
ENV_MODEL = "OPENAI_MODEL"
# Pacing of re-asks (backoff_s, max_wait_s) is in compile.openai (params.yaml); tests pass tiny values.
RETRYABLE_STATUS = frozenset({408, 409, 429})  # and every 5xx
MAX_ERRORS_FED_BACK = 20  # pydantic errors listed in one feedback message
EXCERPT_CHARS = 300  # of a server's error body, in messages

_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n(.*?)```", re.DOTALL)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


class InvalidAnswer(ValueError):
    """An answer that parses and fits the schema but breaks a rule the schema cannot say."""


class _Retry(Exception):
    """A failed attempt worth repeating; ``wait_s`` is the server's requested pause, if any."""

    def __init__(self, reason: str, wait_s: float | None = None) -> None:
        super().__init__(reason)
        self.wait_s = wait_s


@dataclass(frozen=True)
class OpenAISettings:
    """Where and how to ask: resolved from flags, params and the environment (key hidden from repr)."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    timeout_s: float = OpenAIConfig.timeout_s
    retries: int = OpenAIConfig.retries
    temperature: float = OpenAIConfig.temperature
    backoff_s: float = OpenAIConfig.backoff_s
    max_wait_s: float = OpenAIConfig.max_wait_s


def openai_base_url(cfg: OpenAIConfig, base_url: str | None = None, environ: Mapping[str, str] = os.environ) -> str:
    """The endpoint: a flag beats params, params beat OPENAI_BASE_URL ("" when none is given)."""
    return (base_url or cfg.base_url or environ.get(ENV_BASE_URL, "")).strip().rstrip("/")


def openai_api_key(cfg: OpenAIConfig, environ: Mapping[str, str] = os.environ) -> str | None:
    """The key, only ever from the variable named by ``cfg.api_key_env`` (None when unset)."""
    return environ.get(cfg.api_key_env, "").strip() or None


def resolve_openai_settings(
    cfg: OpenAIConfig,
    base_url: str | None = None,
    model: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> OpenAISettings:
    """Flags beat params, params beat the environment (OPENAI_BASE_URL, OPENAI_MODEL); the key
    only comes from the variable named by ``cfg.api_key_env`` so that it never sits in a file.

    A missing base URL or model raises ``BackendUnavailable`` (the compiler then uses ``rules``);
    a missing key is fine: local servers (vLLM, llama.cpp, Ollama) usually need none.
    """
    url = openai_base_url(cfg, base_url, environ)
    name = (model or cfg.model or environ.get(ENV_MODEL, "")).strip()
    if not url:
        raise BackendUnavailable(
            f"openai backend: no base URL (give one as a flag, as compile.openai.base_url in params.yaml, or in {ENV_BASE_URL})")
    if not url.startswith(("http://", "https://")):
        raise BackendUnavailable(f"openai backend: base URL {url!r} is not http(s), e.g. http://localhost:8000/v1")
    if not name:
        raise BackendUnavailable(
            f"openai backend: no model name (give one as a flag, as compile.openai.model in params.yaml, or in {ENV_MODEL})")
    key = openai_api_key(cfg, environ)
    return OpenAISettings(url, name, key, cfg.timeout_s, cfg.retries, cfg.temperature, cfg.backoff_s, cfg.max_wait_s)


def extract_json(text: str) -> Any:
    """The JSON value in a model's answer, also when wrapped in ```json fences, preceded by a
    reasoning model's <think> block, or framed by a sentence of prose."""
    body = _THINK.sub("", text).strip()
    fenced = _FENCE.search(body)
    if fenced:
        body = fenced.group(1).strip()
    try:
        return json.loads(body)
    except json.JSONDecodeError as first:
        start, end = body.find("{"), body.rfind("}")
        if 0 <= start < end:
            try:
                return json.loads(body[start:end + 1])
            except json.JSONDecodeError:
                pass
        raise first


def describe_error(err: Exception) -> str:
    """An answer's fault in words a model can act on: pydantic's errors with their locations, or
    where the JSON stopped parsing."""
    if isinstance(err, ValidationError):
        errors = err.errors(include_url=False)
        lines = [f"- {'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in errors[:MAX_ERRORS_FED_BACK]]
        if len(errors) > MAX_ERRORS_FED_BACK:
            lines.append(f"- ... and {len(errors) - MAX_ERRORS_FED_BACK} more")
        return f"{len(errors)} validation error(s) for {err.title}:\n" + "\n".join(lines)
    if isinstance(err, json.JSONDecodeError):
        return f"not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
    return str(err)


def schema_instruction(model_cls: type[BaseModel]) -> str:
    """The output contract appended to the system prompt (JSON mode has no other way to say it)."""
    schema = json.dumps(model_cls.model_json_schema(), separators=(",", ":"))
    return (f"Answer with exactly one JSON object, no prose, that validates against this JSON schema "
            f"({model_cls.__name__}):\n{schema}")


class ChatClient:
    """One OpenAI-compatible endpoint and model; ``ask`` returns a validated pydantic answer.

    Holds a ``requests.Session`` (keep-alive across the agents' calls) and remembers whether the
    server accepts ``json_schema`` response formats.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = OpenAIConfig.timeout_s,
        temperature: float = OpenAIConfig.temperature,
        retries: int = OpenAIConfig.retries,
        *,
        backoff_s: float = OpenAIConfig.backoff_s,
        max_wait_s: float = OpenAIConfig.max_wait_s,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.__key = api_key or None  # name-mangled: not in the obvious places (vars() still shows it)
        self.timeout_s = float(timeout_s)
        self.temperature = float(temperature)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.max_wait_s = float(max_wait_s)
        self._sleep = sleep
        self.response_mode = "json_schema"  # becomes "json_object" once the server refuses schemas
        self._session = requests.Session()

    @classmethod
    def from_settings(cls, settings: OpenAISettings, **kwargs: Any) -> ChatClient:
        kwargs = {"backoff_s": settings.backoff_s, "max_wait_s": settings.max_wait_s, **kwargs}
        return cls(settings.base_url, settings.model, settings.api_key, settings.timeout_s,
                   settings.temperature, settings.retries, **kwargs)

    def __repr__(self) -> str:
        return (f"ChatClient(base_url={self.base_url!r}, model={self.model!r}, "
                f"api_key={'<set>' if self.__key else None}, mode={self.response_mode!r})")

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    # ------------------------------------------------------------------------------------------
    def ask(
        self,
        messages: Sequence[Mapping[str, str]],
        model_cls: type[M],
        check: Callable[[M], None] | None = None,
    ) -> M:
        """Ask until the answer parses, validates as ``model_cls`` and passes ``check`` (which
        raises ``ValueError`` with a message for the model), at most ``retries + 1`` times."""
        convo = _with_schema(messages, model_cls)
        attempts = self.retries + 1
        last = "no attempt made"
        for attempt in range(1, attempts + 1):
            wait_s: float | None = None
            try:
                content = self._complete(convo, model_cls)
            except _Retry as err:
                last, wait_s = str(err), err.wait_s
            else:
                try:
                    answer = model_cls.model_validate(extract_json(content))
                    if check is not None:
                        check(answer)
                    return answer
                except ValueError as err:  # JSONDecodeError, ValidationError and InvalidAnswer are ValueErrors
                    last, wait_s = f"invalid answer: {self._redact(describe_error(err))}", 0.0  # no pause: it only needs fixing
                    convo += [
                        {"role": "assistant", "content": content},
                        {"role": "user", "content": (
                            f"Your answer was rejected: {describe_error(err)}\n"
                            "Answer again with the complete corrected JSON object only.")},
                    ]
            log.warning("openai %s (%s): attempt %d/%d failed: %s", model_cls.__name__, self.model, attempt, attempts,
                        _one_line(last))
            if attempt < attempts:
                pause = min(self.max_wait_s, wait_s if wait_s is not None else self.backoff_s * 2 ** (attempt - 1))
                if pause > 0:
                    self._sleep(pause)
        raise BackendUnavailable(
            f"openai backend ({self.model} at {self.base_url}) gave no valid {model_cls.__name__} "
            f"after {attempts} attempt(s); last error: {last}")

    def _complete(self, messages: list[dict[str, str]], model_cls: type[BaseModel]) -> str:
        """One chat completion; the assistant's text, or ``_Retry`` / ``BackendUnavailable``."""
        while True:
            payload = {
                "model": self.model,
                "messages": messages,
                "temperature": self.temperature,
                "response_format": self._response_format(model_cls),
            }
            headers = {"Content-Type": "application/json"}
            if self.__key:
                headers["Authorization"] = f"Bearer {self.__key}"
            try:
                reply = self._session.post(self.url, json=payload, headers=headers, timeout=self.timeout_s)
            except requests.Timeout:
                raise _Retry(f"no answer within the {self.timeout_s:g} s timeout") from None
            except requests.ConnectionError as err:
                raise _Retry(f"cannot reach {self.url}: {self._redact(str(err))[:EXCERPT_CHARS]}") from None
            except requests.RequestException as err:  # broken chunks, bad encodings, redirect loops
                raise _Retry(f"the request to {self.url} failed: {self._redact(str(err))[:EXCERPT_CHARS]}") from None
            status = reply.status_code
            if status == 400 and self.response_mode == "json_schema":
                self.response_mode = "json_object"
                log.warning("openai: %s refused a json_schema response format (HTTP 400: %s); using JSON mode from now on",
                            self.base_url, self._excerpt(reply))
                continue
            if status == 429:
                raise _Retry(f"HTTP 429 (rate limited): {self._excerpt(reply)}", _retry_after(reply))
            if status in RETRYABLE_STATUS or status >= 500:
                raise _Retry(f"HTTP {status}: {self._excerpt(reply)}", _retry_after(reply))
            if status >= 400:
                raise BackendUnavailable(
                    f"openai backend ({self.model} at {self.base_url}): HTTP {status}, not retried: {self._excerpt(reply)}")
            return self._content(reply)

    def _response_format(self, model_cls: type[BaseModel]) -> dict[str, Any]:
        if self.response_mode == "json_object":
            return {"type": "json_object"}
        name = re.sub(r"[^A-Za-z0-9_-]", "_", model_cls.__name__)[:64]  # the API's name alphabet
        return {"type": "json_schema",
                "json_schema": {"name": name, "schema": model_cls.model_json_schema(), "strict": False}}

    def _content(self, reply: requests.Response) -> str:
        """The assistant's text from a 2xx chat completion; refusals and empty bodies retry."""
        try:
            body = reply.json()
            choice = body["choices"][0]
            message = choice.get("message") or {}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise _Retry(f"HTTP {reply.status_code} without a chat completion: {self._excerpt(reply)}") from None
        refusal = message.get("refusal")
        if refusal:
            raise _Retry(f"the model refused: {self._redact(str(refusal))[:EXCERPT_CHARS]}")
        if choice.get("finish_reason") == "content_filter":
            raise _Retry("the answer was stopped by the server's content filter")
        content = message.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content if isinstance(content, str) else ""

    def _excerpt(self, reply: requests.Response) -> str:
        text = " ".join(reply.text.split())
        return self._redact(text[:EXCERPT_CHARS]) or "(empty body)"

    def _redact(self, text: str) -> str:
        return text.replace(self.__key, "<redacted>") if self.__key else text


def _with_schema(messages: Sequence[Mapping[str, str]], model_cls: type[BaseModel]) -> list[dict[str, str]]:
    """The conversation with the output contract merged into the first system message (several
    chat templates refuse a second system message)."""
    convo = [dict(m) for m in messages]
    contract = schema_instruction(model_cls)
    if convo and convo[0].get("role") == "system":
        convo[0]["content"] = f"{convo[0].get('content', '')}\n\n{contract}"
    else:
        convo.insert(0, {"role": "system", "content": contract})
    return convo


def _retry_after(reply: requests.Response) -> float | None:
    """Retry-After in seconds; the HTTP-date form is rare for APIs and falls back to backoff."""
    value = reply.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _one_line(text: str) -> str:
    """A multi-line reason folded for one log line."""
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())[:EXCERPT_CHARS * 2]


__all__ = ["ChatClient", "InvalidAnswer", "OpenAISettings", "describe_error", "extract_json", "resolve_openai_settings",
           "schema_instruction"]
