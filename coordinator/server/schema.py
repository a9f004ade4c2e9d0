"""The OpenAI schema: parsing and checking requests, errors in OpenAI's shape, and the answers' shape."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import JSONResponse

from ..generate import build_prompt

DEFAULT_MAX_TOKENS = 512
MAX_STOP_SEQUENCES = 4
# A stop string is looked for after every token, at a cost that grows with its length.
MAX_STOP_CHARS = 256
# What mx.random.seed takes: an unsigned 64-bit integer.
MAX_SEED = 2**64 - 1
# What a chat message costs beyond its role and content, against the prompt's character cap:
# a flood of empty messages still costs the chat template work.
MESSAGE_CHARS = 8


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


@dataclass
class Params:
    """What one request asks the worker to generate."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


class StopText:
    """Cuts the output at the first stop string, holding back text that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text that is safe to send now; sets `stopped` once a stop string is reached."""
        self.text += piece
        found = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if found:
            end = min(found)
            out, self.sent = self.text[self.sent:end], end
            self.stopped = True
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text) - self.sent), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        end = len(self.text) - hold
        out, self.sent = self.text[self.sent:end], end
        return out

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


def config_value(config: dict, name: str) -> Any:
    """A model config's value, also looked up in `text_config` (multimodal checkpoints keep it there)."""
    return config.get(name) or (config.get("text_config") or {}).get(name)


# -- requests


def check_body(body: Any, model_id: str, aliases: set[str]) -> dict:
    """The parsed JSON body of a completion request, checked for what every endpoint needs."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: a string", param="model", code="missing_required_parameter")
    if model not in aliases:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{model_id}'",
                       param="model", code="model_not_found")
    if body.get("n", 1) != 1:
        raise ApiError(400, "Only n=1 is supported", param="n", code="invalid_value")
    if not isinstance(body.get("stream", False), bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream", code="invalid_type")
    _check_unhonoured(body)
    return body


# What this server does as asked (`user` only tags a request, which we neither log nor keep).
HONOURED = ("model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
            "stop", "stream", "stream_options", "n", "user", "return_token_ids")
# OpenAI's parameters that this server does not honour, each with the values that ask for nothing
# (clients send those as defaults); any other value is refused rather than silently ignored.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "tools": (None, []), "tool_choice": (None, "none"), "parallel_tool_calls": (None,),
    "functions": (None, []), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}), "logprobs": (None, False), "top_logprobs": (None, 0),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
    "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,), "web_search_options": (None,),
    "reasoning_effort": (None,), "verbosity": (None,), "store": (None, False), "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
}


def _same(a: Any, b: Any) -> bool:
    # JSON's false is not 0 (`0 == False` in Python): a type must match too, ints and floats alike.
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def _check_unhonoured(body: dict) -> None:
    """Refuses each parameter this server would otherwise silently ignore, naming it."""
    for name, value in body.items():
        if name in HONOURED:
            continue
        if name not in NEUTRAL:
            raise ApiError(400, f"Unrecognized request argument supplied: '{name}'; this server takes "
                           f"{', '.join(HONOURED)}", param=name, code="unknown_parameter")
        if not any(_same(value, ok) for ok in NEUTRAL[name]):
            allowed = " or ".join(json.dumps(ok) for ok in NEUTRAL[name])
            raise ApiError(400, f"'{name}' is not supported by this server; leave it out (or send {allowed})",
                           param=name, code="unsupported_parameter")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and set(options) <= {"include_usage"}
                                    and isinstance(options.get("include_usage", False), bool)):
        raise ApiError(400, "'stream_options' takes only {\"include_usage\": true|false}", param="stream_options",
                       code="invalid_value")


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"'{name}' must be a number, got {json.dumps(value)}", param=name, code="invalid_type")
    if value < lo or (lo_open and value == lo) or value > hi:
        bound = f"{'>' if lo_open else '>='} {lo} and <= {hi}"
        raise ApiError(400, f"'{name}' is {value}; it must be {bound}", param=name, code="invalid_value")
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOP_SEQUENCES:
            raise ApiError(400, f"'stop' has {len(stop)} sequences; at most {MAX_STOP_SEQUENCES} are allowed",
                           param="stop", code="invalid_value")
        if any(len(s) > MAX_STOP_CHARS for s in stop):
            raise ApiError(400, f"'stop' sequences may be at most {MAX_STOP_CHARS} characters long", param="stop",
                           code="invalid_value")
        return stop
    raise ApiError(400, "'stop' must be a string or a list of strings", param="stop", code="invalid_type")


def params(body: dict, prompt_ids: list[int], prompt_param: str, context_length: int | None,
           default_max_tokens: int, max_tokens_limit: int) -> Params:
    """The generation parameters of a request, checked against the model's context length and the
    server's longest completion."""
    n = len(prompt_ids)
    if n == 0:
        raise ApiError(400, "The prompt encodes to no tokens", param=prompt_param, code="invalid_value")
    ctx = context_length
    if ctx and n >= ctx:
        raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, your prompt is {n} "
                       "tokens. Please shorten the prompt.", param=prompt_param, code="context_length_exceeded")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(name)
    if max_tokens is None:
        max_tokens = min(default_max_tokens, ctx - n) if ctx else default_max_tokens
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise ApiError(400, f"'{name}' must be an integer, got {json.dumps(max_tokens)}", param=name,
                       code="invalid_type")
    elif max_tokens < 1:
        raise ApiError(400, f"'{name}' is {max_tokens}; it must be at least 1", param=name, code="invalid_value")
    elif ctx and n + max_tokens > ctx:
        raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                       f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} in the completion). Please "
                       "reduce the prompt or the completion length.", param=name, code="context_length_exceeded")
    elif max_tokens > max_tokens_limit:
        raise ApiError(400, f"'{name}' is {max_tokens}; this server generates at most {max_tokens_limit} tokens "
                       "a request (edgemoe serve --max-tokens-limit)", param=name, code="invalid_value")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, "'seed' must be an integer", param="seed", code="invalid_type")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ApiError(400, f"'seed' is {seed}; it must be between 0 and 2**64-1", param="seed", code="invalid_value")
    return Params(
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)),
        seed=seed,
        stop=_stop(body),
    )


def _message_text(content: Any, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content", code="invalid_value")
        return "".join(parts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                   param=f"messages[{i}].content", code="invalid_type")


def _check_chars(chars: int, max_chars: int, param: str) -> None:
    if chars > max_chars:
        raise ApiError(400, f"The prompt is {chars} characters; this server takes at most {max_chars} "
                       "(edgemoe serve --max-prompt-chars)", param=param, code="context_length_exceeded")


def chat_prompt(tokenizer: Any, body: dict, max_chars: int) -> list[int]:
    """The token ids of a chat request's messages, refused before tokenizing past `max_chars`."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' is required: a non-empty list", param="messages",
                       code="missing_required_parameter")
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a 'role'", param=f"messages[{i}]",
                           code="invalid_value")
        chat.append({"role": m["role"], "content": _message_text(m.get("content"), i)})
    _check_chars(sum(len(m["role"]) + len(m["content"]) + MESSAGE_CHARS for m in chat), max_chars, "messages")
    try:
        return build_prompt(tokenizer, chat)
    except Exception as exc:  # the chat template's own checks (roles, order) are the caller's mistake
        raise ApiError(400, f"The model's chat template refused the messages: {exc}", param="messages",
                       code="invalid_value") from None


def completion_prompt(tokenizer: Any, body: dict, vocab_size: int | None, max_chars: int) -> list[int]:
    """The token ids of a completion request's prompt: text (refused before tokenizing past
    `max_chars`), or token ids as they are."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        _check_chars(len(prompt), max_chars, "prompt")
        return list(tokenizer.encode(prompt))
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if vocab_size and any(t < 0 or t >= vocab_size for t in prompt):
            raise ApiError(400, f"'prompt' holds token ids outside [0, {vocab_size})", param="prompt",
                           code="invalid_value")
        return prompt
    raise ApiError(400, "'prompt' is required: a string, a list of one string, or a list of token ids",
                   param="prompt", code="invalid_value")


# -- answers


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(rid: str, chat: bool, model_id: str, text: str, finish: str, tokens: list[int], prompt_tokens: int,
               return_token_ids: bool) -> dict:
    """A whole (non-streamed) answer: a chat.completion or a text_completion."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    if return_token_ids:  # an extension (as in vLLM): the generated token ids
        choice["token_ids"] = tokens
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model_id,
        "system_fingerprint": None,
        "choices": [choice],
        "usage": usage(prompt_tokens, len(tokens)),
    }


DONE = "data: [DONE]\n\n"


class Chunks:
    """The server-sent events of one streamed answer."""

    def __init__(self, rid: str, chat: bool, model_id: str):
        self.rid, self.chat, self.model_id = rid, chat, model_id
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if chat else "text_completion"

    def _event(self, choices: list[dict], **extra: Any) -> str:
        data = {"id": self.rid, "object": self.object, "created": self.created, "model": self.model_id,
                "choices": choices, **extra}
        return f"data: {json.dumps(data)}\n\n"

    def _choice(self, delta_or_text: dict | str, finish: str | None = None) -> str:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        choice["delta" if self.chat else "text"] = delta_or_text
        return self._event([choice])

    def start(self) -> list[str]:
        """The chat's opening chunk, which names the role; none for a completion."""
        return [self._choice({"role": "assistant", "content": ""})] if self.chat else []

    def text(self, piece: str) -> str:
        return self._choice({"content": piece} if self.chat else piece)

    def finish(self, finish: str) -> str:
        return self._choice({} if self.chat else "", finish)

    def usage(self, prompt_tokens: int, completion_tokens: int) -> str:
        return self._event([], usage=usage(prompt_tokens, completion_tokens))

    @staticmethod
    def error(message: str) -> str:
        error = {"message": message, "type": "server_error", "param": None, "code": "generation_failed"}
        return f"data: {json.dumps({'error': error})}\n\n"
