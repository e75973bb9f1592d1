"""`nextword load --protocol http`: an OpenAI-compatible server (nextword's `serve --http-port`, llama.cpp's
llama-server, vLLM) driven through the few AsyncClient calls the load generator makes, so both protocols run
the same workload through the same measuring code.

- model_info: GET /v1/models (the id, and `max_model_len` when the server gives it);
- tokenize: POST /tokenize, in vLLM's form ({"prompt"} -> {"tokens"}) or llama-server's ({"content"});
- generate: POST /v1/completions with the prompt as token ids, `stream: true`, `ignore_eos`; one event per
  server-sent chunk that carries a token (nextword and llama-server send one chunk per token; the usage
  chunk's count makes up for a token whose chunk held no text), then the finish;
- health: GET /health.

HTTP failures become the load generator's NextwordError with the gRPC code of the status (400
INVALID_ARGUMENT, 429 RESOURCE_EXHAUSTED, 503 UNAVAILABLE, ...), so errors are counted alike. Needs httpx.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from nextword.client.errors import NextwordError

STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
}
NO_CONTEXT = 1 << 30  # a server that does not say its context length: the server will refuse what's too long


@dataclass(frozen=True)
class HttpModelInfo:
    model_id: str
    context_length: int
    special_tokens: tuple = ()  # /tokenize is asked for no special tokens, so none lead the prompts


@dataclass(frozen=True)
class HttpTokenized:
    ids: tuple[int, ...]


@dataclass(frozen=True)
class _Usage:
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class HttpFinish:
    reason: str
    usage: _Usage = _Usage()


@dataclass(frozen=True)
class HttpEvent:
    token: bool | None  # a token arrived (its text is not needed to measure)
    finish: HttpFinish | None
    replica: str = ""  # not told over HTTP: the load report's per-replica counts are gRPC's


class HttpClient:
    """The AsyncClient calls of the load generator, over an OpenAI-compatible HTTP API at `target`
    (HOST:PORT or a base URL). One connection pool of `connections` keep-alive connections."""

    def __init__(self, target: str, connections: int = 256):
        import httpx

        self.target = target
        base = target if "://" in target else f"http://{target}"
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self._http = httpx.AsyncClient(
            base_url=base.rstrip("/").removesuffix("/v1"), limits=limits, timeout=None
        )
        self._model = ""

    async def close(self) -> None:
        await self._http.aclose()

    async def model_info(self, timeout: float | None = None) -> HttpModelInfo:
        card = (await self._get("/v1/models", timeout))["data"][0]
        self._model = card["id"]
        return HttpModelInfo(card["id"], card.get("max_model_len") or NO_CONTEXT)

    async def tokenize(self, text: str, timeout: float | None = None) -> HttpTokenized:
        body = {"prompt": text, "content": text, "add_special_tokens": False}
        return HttpTokenized(tuple(await self._post("/tokenize", body, timeout)))

    async def health(self, timeout: float | None = None) -> str:
        response = await self._request("GET", "/health", timeout)
        return "SERVING" if response.status_code == 200 else "NOT_SERVING"

    def generate(self, prompt, *, max_new_tokens: int, request_id: str = "", timeout: float | None = None,
                 ignore_eos: bool = False, temperature: float = 1.0, seed: int | None = None) -> AsyncIterator[HttpEvent]:  # fmt: skip
        body = {
            "model": self._model,
            "prompt": list(prompt),
            "max_tokens": max_new_tokens,
            "temperature": temperature,
            "ignore_eos": ignore_eos,
            "stream": True,
            "stream_options": {"include_usage": True},  # the exact token count, at the end
        }
        if seed is not None:
            body["seed"] = seed
        return self._stream(body, timeout)

    async def _stream(self, body: dict, timeout: float | None) -> AsyncIterator[HttpEvent]:
        import httpx

        try:
            async with self._http.stream("POST", "/v1/completions", json=body, timeout=timeout) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise _error(response)
                counted, usage, finish = 0, None, None
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise NextwordError(grpc.StatusCode.INTERNAL, str(chunk["error"]))
                    if chunk.get("usage"):
                        usage = chunk["usage"].get("completion_tokens")
                    for choice in chunk.get("choices", ()):
                        finish = choice.get("finish_reason") or finish
                        if choice.get("text") or not choice.get("finish_reason"):
                            counted += 1
                            yield HttpEvent(True, None)
                for _ in range((usage or counted) - counted):  # tokens whose chunk carried no text
                    yield HttpEvent(True, None)
                if finish:
                    yield HttpEvent(None, HttpFinish(finish))
        except httpx.TimeoutException as e:
            raise NextwordError(grpc.StatusCode.DEADLINE_EXCEEDED, str(e)) from None
        except httpx.HTTPError as e:
            raise NextwordError(grpc.StatusCode.UNAVAILABLE, str(e) or type(e).__name__) from None

    async def _request(self, method: str, path: str, timeout: float | None, body=None):
        import httpx

        try:
            return await self._http.request(method, path, json=body, timeout=timeout)
        except httpx.HTTPError as e:
            raise NextwordError(grpc.StatusCode.UNAVAILABLE, str(e) or type(e).__name__) from None

    async def _get(self, path: str, timeout: float | None) -> dict:
        response = await self._request("GET", path, timeout)
        if response.status_code != 200:
            raise _error(response)
        return response.json()

    async def _post(self, path: str, body: dict, timeout: float | None):
        response = await self._request("POST", path, timeout, body)
        if response.status_code != 200:
            raise _error(response)
        return response.json()["tokens"]


def _error(response) -> NextwordError:
    try:
        error = response.json().get("error", {})
        message, field = error.get("message", response.text), error.get("param")
    except (ValueError, AttributeError):
        message, field = response.text, None
    code = STATUS_CODES.get(response.status_code, grpc.StatusCode.UNKNOWN)
    return NextwordError(code, f"HTTP {response.status_code}: {message}", field=field)
