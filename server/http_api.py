"""The OpenAI-compatible HTTP API: FastAPI, served by uvicorn on the gRPC server's own event loop, in front of
the same engine. As thin as the gRPC servicer: pydantic models parse the JSON bodies, this module translates
them into the engine's terms and delegates to the Frontend (server/frontend.py), which validates (one place for
every sampling parameter, whichever protocol), submits and relays; then it translates the results back.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with `stream`: server-sent events
ending in `data: [DONE]`), vLLM's POST /tokenize and /detokenize, GET /health. Errors are OpenAI's error JSON
with the HTTP status of the gRPC code: 400 naming the `param`, 404 for an unknown model, 429 with Retry-After
when the queue is full, 503 while loading or draining. A client that disconnects from a stream cancels its
sequences (Starlette cancels the response when it sees http.disconnect); the engine drops them at its next step.

Where OpenAI and nextword differ: `n` choices of one prompt use seeds seed, seed + 1, ... (each is then the
gRPC generation with that seed); `max_tokens` defaults to 16 for completions (as OpenAI's) and to the server's
default (ModelInfo.defaults.max_new_tokens) for chat; `max_tokens: 0` is allowed with `echo` (prompt
log-probabilities only, as lm-evaluation-harness asks); vLLM's extra sampling fields (`top_k`, `min_p`,
`repetition_penalty`, `ignore_eos`, `stop_token_ids`) are accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from functools import partial
from typing import Literal

import grpc
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from nextword.server.engine import Step
from nextword.server.frontend import Frontend, Generation, RequestError, ScoreResult, invalid
from nextword.server.sampling import SamplingParams

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.INTERNAL: 500,
}
ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}
FINISH_REASONS = {"eos": "stop", "stop": "stop", "stop_token": "stop"}  # anything else ran out: "length"
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
OPTIONAL_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")  # fmt: skip


# ---- request bodies ----


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we have no use for (user, metadata, ...)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    n: int = Field(1, ge=1, le=16)
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=1)


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


# ---- the app ----


def create_app(frontend: Frontend, max_request_bytes: int = 1 << 20, token: str | None = None) -> FastAPI:
    app = FastAPI(title="nextword", description="OpenAI-compatible API of a nextword server", docs_url=None)
    api = _Api(frontend)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, e: RequestError) -> JSONResponse:
        return _error_response(frontend, e)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        param = _param_path(first.get("loc", ()))
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return _error_response(frontend, invalid(param, message))

    @app.get("/health")
    async def health() -> JSONResponse:
        frontend.engine()  # 503 while loading or draining
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict:
        engine = frontend.engine()
        card = {"id": engine.model_id, "object": "model", "created": 0, "owned_by": "nextword"}
        return {"object": "list", "data": [card | {"max_model_len": engine.max_context}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await api.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await api.chat(body, request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        engine = api.check_model(body.model)
        if body.messages is not None:
            ids = await frontend.encode_chat(_messages(body.messages), "messages", body.add_generation_prompt)
        elif body.prompt:
            encode = partial(engine.tokenizer.encode, body.prompt, add_special_tokens=body.add_special_tokens)
            ids = await frontend.off_loop(len(body.prompt), encode)
        else:
            raise invalid("prompt", "give a prompt or messages to tokenize")
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        engine = api.check_model(body.model)
        ids = frontend.check_ids(body.tokens, "tokens")
        return {"prompt": engine.tokenizer.decode(ids)}

    return _LimitBody(app, max_request_bytes, token)


class _Api:
    """The two generation routes: OpenAI request -> prompts and SamplingParams -> Frontend -> OpenAI JSON."""

    def __init__(self, frontend: Frontend):
        self.frontend = frontend

    def check_model(self, model: str | None):
        engine = self.frontend.engine()
        if model and model != engine.model_id:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"the model `{model}` does not exist: this server serves {engine.model_id}",
                "model",
            )
        return engine

    async def completions(self, body: CompletionRequest, request: Request):
        self.check_model(body.model)
        if body.best_of not in (None, body.n):
            raise invalid("best_of", "best_of is not supported (only best_of = n)")
        if body.suffix:
            raise invalid("suffix", "suffix is not supported")
        prompts = await self._prompts(body.prompt)
        if body.max_tokens == 0 and not body.echo:
            raise invalid("max_tokens", "max_tokens must be at least 1 (0 only with echo)")
        max_tokens = COMPLETIONS_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        top_n = body.logprobs or 0
        renames = {"top_n": "logprobs", "max_new_tokens": "max_tokens"}
        echoed = [None] * len(prompts)
        if body.echo and body.logprobs is not None:  # the prompt's own log-probabilities, by the Score path
            echoed = await asyncio.gather(*(self._score(p, top_n, renames) for p in prompts))
        gens = self._start(body, prompts, max_tokens, top_n, renames) if max_tokens else []
        out = _CompletionChoices(self, body, prompts, echoed, top_n)
        if body.stream:
            return _sse(out.stream(gens, request), gens)
        return out.whole(await _collect(gens, request), len(prompts) * body.n)

    async def chat(self, body: ChatRequest, request: Request):
        self.check_model(body.model)
        prompt = await self.frontend.encode_chat(_messages(body.messages), "messages")
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens == 0:
            raise invalid("max_tokens", "max_tokens must be at least 1")
        top_n = (body.top_logprobs or 0) if body.logprobs else 0
        if body.top_logprobs and not body.logprobs:
            raise invalid("top_logprobs", "top_logprobs needs logprobs: true")
        renames = {"top_n": "top_logprobs", "max_new_tokens": "max_tokens", "prompt": "messages"}
        gens = self._start(body, [prompt], max_tokens, top_n, renames)
        out = _ChatChoices(self, body, prompt)
        if body.stream:
            return _sse(out.stream(gens, request), gens)
        return out.whole(await _collect(gens, request))

    # ---- translation ----

    async def _prompts(self, prompt) -> list[list[int]]:
        """One prompt or a list of them, each text or token ids."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise invalid("prompt", "prompt is empty")
        if len(prompt) > 16:
            raise invalid("prompt", f"at most 16 prompts per request, got {len(prompt)}")
        return [
            await self.frontend.encode_text(p, "prompt")
            if isinstance(p, str)
            else self.frontend.check_ids(p, "prompt")
            for p in prompt
        ]

    def sampling(
        self, body: _Sampling, max_tokens: int | None, top_n: int, seed: int | None
    ) -> SamplingParams:
        given = {name: getattr(body, name) for name in OPTIONAL_SAMPLING if getattr(body, name) is not None}
        if body.logit_bias:
            try:
                given["logit_bias"] = tuple((int(k), v) for k, v in body.logit_bias.items())
            except ValueError:
                raise invalid(
                    "logit_bias", "logit_bias keys must be token ids (integers as strings)"
                ) from None
        if max_tokens is not None:
            given["max_new_tokens"] = max_tokens
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        return SamplingParams(
            **given,
            seed=seed,
            stop=tuple(stop),
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            top_n=top_n,
        )

    def _start(self, body: _Sampling, prompts, max_tokens, top_n, renames) -> list[Generation]:
        """Submit n generations per prompt (choice index = prompt * n + i, seed = seed + i); all or none."""
        gens: list[Generation] = []
        request_id = uuid.uuid4().hex[:16]
        try:
            for p, prompt in enumerate(prompts):
                for i in range(body.n):
                    seed = None if body.seed is None else body.seed + i
                    params = self.sampling(body, max_tokens, top_n, seed)
                    gens.append(self.frontend.generate(prompt, params, f"{request_id}-{p * body.n + i}"))
        except RequestError as e:
            for gen in gens:
                gen.close()
            raise _renamed(e, renames) from None
        return gens

    async def _score(self, prompt: list[int], top_n: int, renames) -> ScoreResult | None:
        if len(prompt) < 2:
            return None
        try:
            return await self.frontend.score(prompt, top_n)
        except RequestError as e:
            raise _renamed(e, renames) from None

    def token_text(self, token_id: int) -> str:
        return self.frontend.runner.engine.tokenizer.token_text(token_id)


class _CompletionChoices:
    """/v1/completions responses: text_completion objects, whole or as chunks."""

    def __init__(self, api: _Api, body: CompletionRequest, prompts, echoed, top_n: int):
        self.api, self.body, self.prompts, self.echoed, self.top_n = api, body, prompts, echoed, top_n
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        self.model = api.frontend.runner.engine.model_id
        self.want_logprobs = body.logprobs is not None

    def _object(self, choices, usage=None) -> dict:
        out = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model}
        out["choices"] = choices
        if usage is not None:
            out["usage"] = usage
        return out

    def _echo(self, index: int) -> tuple[str, dict | None]:
        """The prompt's text and, with logprobs, its tokens' log-probabilities (the first has none)."""
        p = index // self.body.n
        ids = self.prompts[p]
        text = self.api.frontend.runner.engine.tokenizer.decode(ids)
        if not self.want_logprobs:
            return text, None
        lp = _new_logprobs()
        scores = self.echoed[p]
        for k, token_id in enumerate(ids):
            if k == 0 or scores is None:
                _add_logprob(lp, self.api.token_text(token_id), None, None)
            else:
                top = scores.top[k - 1] if scores.top else ()
                alts = {self.api.token_text(t.token_id): t.logprob for t in top}
                _add_logprob(lp, self.api.token_text(token_id), float(scores.logprobs[k - 1]), alts)
        return text, lp

    def _step_logprobs(self, lp: dict, step: Step) -> None:
        if self.want_logprobs and step.token is not None:
            t = step.token
            alts = {self.api.token_text(a.token_id): a.logprob for a in t.top}
            _add_logprob(lp, self.api.token_text(t.token_id), t.logprob, alts)

    def whole(self, results: list[list[Step]], count: int) -> dict:
        choices, completion_tokens = [], 0
        for index in range(count):
            steps = results[index] if results else []
            text, lp = (
                self._echo(index) if self.body.echo else ("", _new_logprobs() if self.want_logprobs else None)
            )
            for step in steps:
                text += step.text
                self._step_logprobs(lp, step)
            finish = steps[-1].finish if steps else None
            completion_tokens += finish.generated_tokens if finish else 0
            choices.append(
                {"index": index, "text": text, "logprobs": lp, "finish_reason": _finish_reason(finish)}
            )
        return self._object(choices, self._usage(completion_tokens))

    def _usage(self, completion_tokens: int) -> dict:
        prompt_tokens = sum(map(len, self.prompts))
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip

    async def stream(self, gens: list[Generation], request: Request) -> AsyncIterator[str]:
        completion_tokens = 0
        if self.body.echo:
            for index in range(len(self.prompts) * self.body.n):
                text, lp = self._echo(index)
                yield _event(
                    self._object([{"index": index, "text": text, "logprobs": lp, "finish_reason": None}])
                )
        async for index, step in _merged(gens):
            lp = _new_logprobs() if self.want_logprobs else None
            self._step_logprobs(lp, step)
            f = step.finish
            completion_tokens += f.generated_tokens if f else 0
            choice = {"index": index, "text": step.text, "logprobs": lp, "finish_reason": _finish_reason(f)}
            yield _event(self._object([choice]))
        if self.body.stream_options and self.body.stream_options.include_usage:
            yield _event(self._object([], self._usage(completion_tokens)))
        yield "data: [DONE]\n\n"


class _ChatChoices:
    """/v1/chat/completions responses: chat.completion objects, or chat.completion.chunk events."""

    def __init__(self, api: _Api, body: ChatRequest, prompt: list[int]):
        self.api, self.body, self.prompt_tokens = api, body, len(prompt)
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.model = api.frontend.runner.engine.model_id

    def _object(self, kind: str, choices, usage=None) -> dict:
        out = {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            out["usage"] = usage
        return out

    def _logprobs(self, steps: list[Step]) -> dict | None:
        if not self.body.logprobs:
            return None
        content = []
        for step in steps:
            if step.token is None:
                continue
            t = step.token
            top = [_chat_logprob(self.api.token_text(a.token_id), a.logprob) for a in t.top]
            content.append(_chat_logprob(self.api.token_text(t.token_id), t.logprob) | {"top_logprobs": top})
        return {"content": content}

    def _usage(self, completion_tokens: int) -> dict:
        p = self.prompt_tokens
        return {
            "prompt_tokens": p,
            "completion_tokens": completion_tokens,
            "total_tokens": p + completion_tokens,
        }

    def whole(self, results: list[list[Step]]) -> dict:
        choices, completion_tokens = [], 0
        for index, steps in enumerate(results):
            finish = steps[-1].finish
            completion_tokens += finish.generated_tokens
            message = {"role": "assistant", "content": "".join(s.text for s in steps)}
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": self._logprobs(steps),
                    "finish_reason": _finish_reason(finish),
                }
            )
        return self._object("chat.completion", choices, self._usage(completion_tokens))

    async def stream(self, gens: list[Generation], request: Request) -> AsyncIterator[str]:
        chunk = "chat.completion.chunk"
        for index in range(len(gens)):
            delta = {"role": "assistant", "content": ""}
            yield _event(
                self._object(
                    chunk, [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]
                )
            )
        completion_tokens = 0
        async for index, step in _merged(gens):
            f = step.finish
            completion_tokens += f.generated_tokens if f else 0
            delta = {"content": step.text} if step.text or not f else {}
            choice = {
                "index": index,
                "delta": delta,
                "logprobs": self._logprobs([step]),
                "finish_reason": _finish_reason(f),
            }
            yield _event(self._object(chunk, [choice]))
        if self.body.stream_options and self.body.stream_options.include_usage:
            yield _event(self._object(chunk, [], self._usage(completion_tokens)))
        yield "data: [DONE]\n\n"


# ---- helpers ----


def _messages(messages: list[ChatMessage]) -> list[dict]:
    def text(content) -> str:
        if content is None or isinstance(content, str):
            return content or ""
        return "".join(part.text for part in content)

    return [{"role": m.role, "content": text(m.content)} for m in messages]


async def _collect(gens: list[Generation], request: Request) -> list[list[Step]]:
    """Every step of every generation; a client that disconnects first cancels them all (as vLLM's
    listen_for_disconnect: once the body is read, the next ASGI message is http.disconnect)."""

    async def one(gen: Generation) -> list[Step]:
        return [step async for step in gen.steps()]

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(asyncio.gather(*(one(gen) for gen in gens)))
    work.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even when abandoned
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            raise RequestError(grpc.StatusCode.CANCELLED, "the client disconnected")
        return work.result()
    finally:  # done, failed or disconnected: nothing is left running
        watch.cancel()
        work.cancel()
        for gen in gens:
            gen.close()


async def _merged(gens: list[Generation]) -> AsyncIterator[tuple[int, Step]]:
    """The steps of several generations as they come, tagged with their choice index."""
    if len(gens) == 1:  # the common case, without a task in between
        async for step in gens[0].steps():
            yield 0, step
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, gen: Generation) -> None:
        try:
            async for step in gen.steps():
                queue.put_nowait((index, step))
        except RequestError as e:
            queue.put_nowait((index, e))

    tasks = [asyncio.ensure_future(pump(i, gen)) for i, gen in enumerate(gens)]
    try:
        for _ in range(len(gens)):
            while True:
                index, step = await queue.get()
                if isinstance(step, Exception):
                    raise step
                yield index, step
                if step.finish:
                    break
    finally:
        for task in tasks:
            task.cancel()


def _sse(events: AsyncIterator[str], gens: list[Generation]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except RequestError as e:  # after the 200 went out: the error goes in-band
            yield _event({"error": _error_body(e)})
            yield "data: [DONE]\n\n"
        finally:  # done, failed, or cancelled by a disconnect
            for gen in gens:
                gen.close()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _new_logprobs() -> dict:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def _add_logprob(lp: dict, text: str, logprob: float | None, top: dict | None) -> None:
    offset = lp["text_offset"][-1] + len(lp["tokens"][-1]) if lp["tokens"] else 0
    lp["tokens"].append(text)
    lp["token_logprobs"].append(logprob)
    lp["top_logprobs"].append(top)
    lp["text_offset"].append(offset)


def _chat_logprob(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def _finish_reason(finish) -> str | None:
    return None if finish is None else FINISH_REASONS.get(finish.reason, "length")


def _renamed(e: RequestError, renames: dict[str, str]) -> RequestError:
    """The error with its field under the OpenAI parameter's name."""
    if e.field in renames:
        e.field = renames[e.field]
    return e


def _param_path(loc) -> str:
    """A pydantic error location as a parameter path: ("body", "messages", 0, "role") -> "messages[0].role";
    the union-member tags pydantic inserts (str, list[int], ...) are left out."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.isidentifier() and part not in ("str", "int", "float", "bool", "list", "dict"):
            path += f".{part}" if path else part
        else:
            break
    return path


def _error_body(e: RequestError) -> dict:
    status = HTTP_STATUS.get(e.code, 500)
    code = {429: "rate_limit_exceeded", 404: "model_not_found"}.get(status, e.code.name.lower())
    return {
        "message": e.message,
        "type": ERROR_TYPES.get(status, "server_error"),
        "param": e.field,
        "code": code,
    }


def _error_response(frontend: Frontend, e: RequestError) -> JSONResponse:
    if e.code != grpc.StatusCode.CANCELLED:  # a client gone was counted when its sequences were cancelled
        frontend.metrics.observe_error(e.code.name)
    headers = {"Retry-After": str(max(1, round(e.retry_after_s)))} if e.retry_after_s is not None else None
    return JSONResponse({"error": _error_body(e)}, status_code=HTTP_STATUS.get(e.code, 500), headers=headers)


class _LimitBody:
    """ASGI middleware: with the server's token (--token-file), every route but /health needs it as
    `Authorization: Bearer <token>` (the OpenAI clients' api_key), else 401; a request body larger than
    --max-request-bytes is refused with 413, however it is sent (Content-Length or chunked)."""

    def __init__(self, app, max_bytes: int, token: str | None = None):
        self.app, self.max_bytes = app, max_bytes
        self.expected = None if token is None else f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", ()))
        authorized = hmac.compare_digest(headers.get(b"authorization", b""), self.expected or b"")
        if self.expected and scope["path"] != "/health" and not authorized:
            return await _send_error(send, 401, "a valid bearer token is required", "invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send) -> None:
        await _send_error(send, 413, f"the request body exceeds {self.max_bytes} bytes", "request_too_large")


async def _send_error(send, status: int, message: str, code: str) -> None:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps({"error": error}).encode()})


class _TooLarge(Exception):
    pass


class HTTPServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # serve() owns SIGINT and SIGTERM: uvicorn must not take them over
        yield
