"""The thin client: a context-managed channel and stub, one method per RPC, small frozen dataclasses out.

    with Client("127.0.0.1:50051") as c:
        for event in c.generate("The capital of France is", max_new_tokens=8):
            print(event.text, end="", flush=True)

`AsyncClient` has the same methods on grpc.aio. Every failed call raises a typed `NextwordError`.

`session()` opens the bidirectional Session RPC (for editors: one prompt per keystroke, each superseding the
one in flight):

    async with client.session() as s:
        await s.send("def fib(n):", max_new_tokens=16, max_lines=1)
        async for item in s:  # GenerateEvent, or SessionError for a request that failed in-band
            ...
"""

from __future__ import annotations

import asyncio
import ipaddress
import operator
import os
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import grpc
from google.protobuf import wrappers_pb2

from nextword.client.errors import DeadlineExceeded, NextwordError, Unavailable, from_rpc_error
from nextword.client.types import (
    AttentionMap,
    Completion,
    Distribution,
    Embeddings,
    GenerateEvent,
    ModelInfo,
    NearestTokens,
    Scores,
    SessionError,
    Tokenized,
    session_item,
)
from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_OPTIONS = {
    "grpc.max_receive_message_length": 64 << 20,  # a full-vocabulary distribution is 4 bytes per token
}
SAMPLING_FIELDS = frozenset(pb.SamplingParams.DESCRIPTOR.fields_by_name)

# grpc.health.v1 without depending on grpcio-health-checking (a server extra): HealthCheckRequest is
# {string service = 1} and HealthCheckResponse is {ServingStatus status = 1}, the same wire format as the
# well-known StringValue and Int32Value.
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_STATUSES = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")

Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]


def _health_request(service: str) -> bytes:
    return wrappers_pb2.StringValue(value=service).SerializeToString()


def _health_status(data: bytes) -> str:
    status = wrappers_pb2.Int32Value.FromString(data).value
    return HEALTH_STATUSES[status] if 0 <= status < len(HEALTH_STATUSES) else str(status)


# ---- keyword arguments -> protobuf ----


def chat_pb(messages: Sequence[Mapping[str, str]]) -> pb.Chat:
    try:
        return pb.Chat(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages])
    except KeyError as e:
        raise ValueError(f"a chat message needs 'role' and 'content' (missing {e})") from None


def prompt_pb(prompt: Prompt) -> pb.Prompt:
    """Text (str), token ids (a sequence of ints) or chat messages (a sequence of role/content dicts)."""
    if isinstance(prompt, str):
        return pb.Prompt(text=prompt)
    try:
        if isinstance(prompt, (bytes, Mapping)):
            raise TypeError
        items = list(prompt)
        if not (items and all(isinstance(m, Mapping) for m in items)):
            return pb.Prompt(token_ids=pb.TokenIds(ids=[operator.index(i) for i in items]))
    except TypeError:
        raise TypeError(
            "prompt must be a str, a list of token ids or a list of {'role', 'content'} dicts"
        ) from None
    return pb.Prompt(chat=chat_pb(items))


def sampling_pb(sampling: Mapping) -> pb.SamplingParams:
    """SamplingParams from keyword arguments; None leaves a field unset (the server's default applies)."""
    unknown = sorted(set(sampling) - SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling parameter(s): {', '.join(unknown)}")
    params = pb.SamplingParams()
    for name, value in sampling.items():
        if value is None:
            continue
        if name == "logit_bias":
            params.logit_bias.update({int(k): float(v) for k, v in value.items()})
        elif name in ("stop", "stop_token_ids"):
            getattr(params, name).extend([value] if isinstance(value, (str, int)) else value)
        else:
            setattr(params, name, value)
    return params


def generate_request(
    prompt: Prompt,
    *,
    max_new_tokens: int | None,
    top_n: int,
    request_id: str,
    sampling: Mapping,
    max_time_ms: int | None = None,
    max_lines: int | None = None,
) -> pb.GenerateRequest:
    """A GenerateRequest; None leaves max_new_tokens, max_time_ms and max_lines unset."""
    request = pb.GenerateRequest(
        request_id=request_id, prompt=prompt_pb(prompt), sampling=sampling_pb(sampling), top_n=top_n
    )
    if max_new_tokens is not None:
        request.max_new_tokens = max_new_tokens
    if max_time_ms is not None:
        request.max_time_ms = max_time_ms
    if max_lines is not None:
        request.max_lines = max_lines
    return request


def score_request(prompt: Prompt, top_n: int, window: int | None, stride: int | None) -> pb.ScoreRequest:
    return pb.ScoreRequest(prompt=prompt_pb(prompt), top_n=top_n, window=window, stride=stride)


def new_request_id() -> str:
    return uuid.uuid4().hex


def tokenize_request(text_or_chat: str | Sequence[Mapping[str, str]]) -> pb.TokenizeRequest:
    if isinstance(text_or_chat, str):
        return pb.TokenizeRequest(text=text_or_chat)
    return pb.TokenizeRequest(chat=chat_pb(text_or_chat))


def embed_request(texts: Sequence[str], layer: int | None) -> pb.EmbedRequest:
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string")
    request = pb.EmbedRequest(texts=texts)
    if layer is not None:
        request.layer = layer
    return request


Term = str | int | tuple[str | int, float]


def nearest_tokens_request(terms: Sequence[Term], top_n: int, include_terms: bool) -> pb.NearestTokensRequest:
    """Each term is a text (its first token is used), a token id, or a (text or id, weight) pair."""
    request = pb.NearestTokensRequest(top_n=top_n, include_terms=include_terms)
    for term in terms:
        token, weight = term if isinstance(term, tuple) else (term, None)
        message = pb.EmbeddingTerm(text=token) if isinstance(token, str) else pb.EmbeddingTerm(token_id=token)
        if weight is not None:
            message.weight = weight
        request.terms.append(message)
    return request


def attention_request(prompt: Prompt, layer: int | None, head: int | None) -> pb.AttentionRequest:
    request = pb.AttentionRequest(prompt=prompt_pb(prompt))
    if layer is not None:
        request.layer = layer
    if head is not None:
        request.head = head
    return request


def channel_options(options) -> list[tuple[str, object]]:
    """The default options, overridden by `options` (a dict or a list of (name, value) pairs)."""
    return list((DEFAULT_OPTIONS | dict(options or {})).items())


def _read(path: str | os.PathLike | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def is_loopback_host(host: str) -> bool:
    """Is `host` (a name or an IPv4/IPv6 address, brackets allowed) a loopback address?"""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_target(target: str) -> bool:
    """Is `target` (host:port, [v6]:port, localhost:port, or unix:) on this machine?"""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    host = target.rsplit(":", 1)[0] if target.count(":") == 1 or target.startswith("[") else target
    return is_loopback_host(host)


def make_channel(
    target: str,
    *,
    aio: bool,
    options=None,
    tls_ca: str | os.PathLike | None = None,
    tls_cert: str | os.PathLike | None = None,
    tls_key: str | os.PathLike | None = None,
    tls: bool = False,
    token: str | None = None,
):
    """The one place a channel is made: its options and credentials.

    TLS when `tls` or any of `tls_ca` (the CA that signed the server's certificate; default: the system's
    roots) / `tls_cert` + `tls_key` (this client's certificate, for servers that require one) is given.
    `token` is sent as `authorization: Bearer <token>` on every call; gRPC sends call credentials only over
    TLS or to a loopback address (local credentials), so a token to a remote plaintext server is refused
    here rather than sent in clear.
    """
    grpc_mod = grpc.aio if aio else grpc
    options = channel_options(options)
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("a client certificate needs both tls_cert and tls_key")
    if tls or tls_ca or tls_cert:
        creds = grpc.ssl_channel_credentials(_read(tls_ca), _read(tls_key), _read(tls_cert))
    elif token:
        if not is_loopback_target(target):
            raise ValueError(
                f"refusing to send the token without TLS to {target}: give the server's CA (--tls-ca) "
                "or use a loopback address"
            )
        creds = grpc.local_channel_credentials()
    else:
        return grpc_mod.insecure_channel(target, options=options)
    if token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return grpc_mod.secure_channel(target, creds, options=options)


# ---- the clients ----


class _ClientBase:
    def __init__(self, target: str, timeout: float | None):
        self.target, self.timeout = target, timeout

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"


class Client(_ClientBase):
    """A blocking client. `timeout` (seconds) is the default deadline of every call; None waits forever.

    `options` are gRPC channel options (dict or pairs) added to DEFAULT_OPTIONS. `tls_ca`, `tls_cert`,
    `tls_key`, `tls` and `token` secure the channel (see `make_channel`).
    """

    def __init__(
        self, target: str = DEFAULT_TARGET, *, timeout: float | None = None, options=None, **security
    ):
        super().__init__(target, timeout)
        self._channel = make_channel(target, aio=False, options=options, **security)
        self._stub = nextword_pb2_grpc.InferenceStub(self._channel)
        self._health = self._channel.unary_unary(
            HEALTH_CHECK, request_serializer=_health_request, response_deserializer=_health_status
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, request, timeout: float | None, **kwargs):
        try:
            return method(request, timeout=self._deadline(timeout), **kwargs)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def generate(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int | None = None,
        top_n: int = 0,
        request_id: str = "",
        timeout: float | None = None,
        max_time_ms: int | None = None,
        max_lines: int | None = None,
        **sampling,
    ) -> Iterator[GenerateEvent]:
        """Stream one event per generated token; the last event carries `finish`.

        Args:
            prompt: text, a list of token ids, or a list of {"role": ..., "content": ...} chat messages.
            max_new_tokens: tokens to generate at most (None: the server's default).
            top_n: alternatives reported with each token.
            request_id: echoed in every event (the server makes one up when empty).
            timeout: deadline of the whole stream, in seconds (None: the client's default).
            max_time_ms: stop after this many milliseconds from arrival (finish reason "time"); None or 0:
                no limit.
            max_lines: stop once the output holds this many complete lines (finish reason "lines"); None
                or 0: no limit.
            **sampling: SamplingParams fields (temperature, top_k, top_p, min_p, repetition_penalty,
                presence_penalty, frequency_penalty, logit_bias, seed, stop, stop_token_ids, ignore_eos);
                None leaves a field to the server's default.

        Returns:
            An iterator of GenerateEvent. The RPC starts at the first `next()`; closing the iterator (or
            leaving a for loop early) cancels it.
        """
        request = generate_request(
            prompt,
            max_new_tokens=max_new_tokens,
            top_n=top_n,
            request_id=request_id,
            sampling=sampling,
            max_time_ms=max_time_ms,
            max_lines=max_lines,
        )
        return self._stream(request, self._deadline(timeout))

    def _stream(self, request: pb.GenerateRequest, timeout: float | None) -> Iterator[GenerateEvent]:
        call = self._stub.Generate(request, timeout=timeout)
        try:
            for event in call:
                yield GenerateEvent.from_pb(event)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()  # a no-op once the stream has ended; otherwise the server stops at its next step

    def complete(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int | None = None,
        top_n: int = 0,
        request_id: str = "",
        timeout: float | None = None,
        max_time_ms: int | None = None,
        max_lines: int | None = None,
        **sampling,
    ) -> Completion:
        """The same as `generate`, answered once with the whole result."""
        request = generate_request(
            prompt,
            max_new_tokens=max_new_tokens,
            top_n=top_n,
            request_id=request_id,
            sampling=sampling,
            max_time_ms=max_time_ms,
            max_lines=max_lines,
        )
        return Completion.from_pb(self._call(self._stub.Complete, request, timeout))

    def session(self, *, timeout: float | None = None) -> Session:
        """Open a Session: `send()` one request per keystroke, iterate for GenerateEvent / SessionError items.

        Each new request supersedes the one in flight (finish reason "superseded"). A reader thread receives
        the events; `close()` half-closes and waits for the server to end the stream. Use it as a context
        manager (`with c.session() as s:`), which closes it (or cancels it when the block raises).
        `timeout` is the deadline of the whole session (None: the client's default).
        """
        return Session(self._stub, self._deadline(timeout))

    def next_token_probabilities(
        self, prompt: Prompt, top_n: int = 10, full_vocabulary: bool = False, *, timeout: float | None = None
    ) -> Distribution:
        """The distribution of the token after `prompt` (with `full_vocabulary`: every log-probability)."""
        request = pb.NextTokenProbabilitiesRequest(
            prompt=prompt_pb(prompt), top_n=top_n, full_vocabulary=full_vocabulary
        )
        return Distribution.from_pb(self._call(self._stub.NextTokenProbabilities, request, timeout))

    def score(
        self,
        prompt: Prompt,
        top_n: int = 0,
        window: int | None = None,
        stride: int | None = None,
        *,
        timeout: float | None = None,
    ) -> Scores:
        """The log-probability of every token of `prompt` given the ones before it, with the perplexity;
        long prompts in windows of `window` tokens every `stride` tokens (default: the context, no overlap)."""
        return Scores.from_pb(
            self._call(self._stub.Score, score_request(prompt, top_n, window, stride), timeout)
        )

    def tokenize(
        self, text_or_chat: str | Sequence[Mapping[str, str]], *, timeout: float | None = None
    ) -> Tokenized:
        """Token ids and texts of a string, or of chat messages rendered with the chat template."""
        return Tokenized.from_pb(self._call(self._stub.Tokenize, tokenize_request(text_or_chat), timeout))

    def detokenize(
        self, ids: Sequence[int], skip_special_tokens: bool = False, *, timeout: float | None = None
    ) -> str:
        request = pb.DetokenizeRequest(ids=ids, skip_special_tokens=skip_special_tokens)
        return self._call(self._stub.Detokenize, request, timeout).text

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return ModelInfo.from_pb(self._call(self._stub.ModelInfo, pb.ModelInfoRequest(), timeout))

    def embed(
        self, texts: Sequence[str], layer: int | None = None, *, timeout: float | None = None
    ) -> Embeddings:
        """Sentence embeddings of `texts` (unit length: cosine = dot product), and with `layer` each token's
        vector: 0 = its row of the input embedding table, k in 1..L = the hidden state after layer k."""
        return Embeddings.from_pb(self._call(self._stub.Embed, embed_request(texts, layer), timeout))

    def nearest_tokens(
        self,
        terms: Sequence[Term],
        top_n: int = 10,
        include_terms: bool = False,
        *,
        timeout: float | None = None,
    ) -> NearestTokens:
        """The tokens whose input embeddings are nearest (cosine) to the weighted sum of the terms' embeddings.
        A term is a text (its first token: mind the leading space, " dog"), a token id, or a (text or id,
        weight) pair; the weight defaults to 1. dog : puppy :: cat : ? is [(" puppy", 1), (" dog", -1), " cat"].
        """
        request = nearest_tokens_request(terms, top_n, include_terms)
        return NearestTokens.from_pb(self._call(self._stub.NearestTokens, request, timeout))

    def attention(
        self,
        prompt: Prompt,
        layer: int | None = None,
        head: int | None = None,
        *,
        timeout: float | None = None,
    ) -> AttentionMap:
        """The attention weights [T, T] over the prompt's tokens of `layer` (1..L) and `head` (0..H-1); None
        means the mean over all layers / heads."""
        request = attention_request(prompt, layer, head)
        return AttentionMap.from_pb(self._call(self._stub.Attention, request, timeout), layer, head)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The grpc.health.v1 status: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN"."""
        return self._call(self._health, service, timeout)

    def wait_until_ready(self, timeout: float = 60, service: str = "", interval: float = 0.2) -> None:
        """Poll health until SERVING (the server answers NOT_SERVING while it loads the model).

        Raises:
            TimeoutError: not SERVING after `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        status = "UNAVAILABLE"
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                status = self._call(self._health, service, min(remaining, 5.0), wait_for_ready=True)
            except (Unavailable, DeadlineExceeded) as e:
                status = e.code_name
            if status == "SERVING":
                return
            time.sleep(max(0.0, min(interval, deadline - time.monotonic())))
        raise TimeoutError(f"{self.target} is not SERVING after {timeout} s (last status: {status})")


class AsyncClient(_ClientBase):
    """The asyncio client: the same methods as `Client`, as coroutines (`generate` is an async iterator).

    Create it inside a running event loop; use `async with AsyncClient(...) as c:` or `await c.close()`.
    """

    def __init__(
        self, target: str = DEFAULT_TARGET, *, timeout: float | None = None, options=None, **security
    ):
        super().__init__(target, timeout)
        self._channel = make_channel(target, aio=True, options=options, **security)
        self._stub = nextword_pb2_grpc.InferenceStub(self._channel)
        self._health = self._channel.unary_unary(
            HEALTH_CHECK, request_serializer=_health_request, response_deserializer=_health_status
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method, request, timeout: float | None, **kwargs):
        try:
            return await method(request, timeout=self._deadline(timeout), **kwargs)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def generate(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int | None = None,
        top_n: int = 0,
        request_id: str = "",
        timeout: float | None = None,
        max_time_ms: int | None = None,
        max_lines: int | None = None,
        **sampling,
    ) -> AsyncIterator[GenerateEvent]:
        """See `Client.generate`. `aclose()` (or `contextlib.aclosing`) cancels the RPC at once; an iterator
        left behind by `break` is cancelled when asyncio finalizes it."""
        request = generate_request(
            prompt,
            max_new_tokens=max_new_tokens,
            top_n=top_n,
            request_id=request_id,
            sampling=sampling,
            max_time_ms=max_time_ms,
            max_lines=max_lines,
        )
        return self._stream(request, self._deadline(timeout))

    async def _stream(
        self, request: pb.GenerateRequest, timeout: float | None
    ) -> AsyncIterator[GenerateEvent]:
        call = self._stub.Generate(request, timeout=timeout)
        try:
            async for event in call:
                yield GenerateEvent.from_pb(event)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    async def complete(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int | None = None,
        top_n: int = 0,
        request_id: str = "",
        timeout: float | None = None,
        max_time_ms: int | None = None,
        max_lines: int | None = None,
        **sampling,
    ) -> Completion:
        request = generate_request(
            prompt,
            max_new_tokens=max_new_tokens,
            top_n=top_n,
            request_id=request_id,
            sampling=sampling,
            max_time_ms=max_time_ms,
            max_lines=max_lines,
        )
        return Completion.from_pb(await self._call(self._stub.Complete, request, timeout))

    def session(self, *, timeout: float | None = None) -> AsyncSession:
        """See `Client.session`: the Session RPC on this loop (`async with c.session() as s:`). A reader task
        receives the events; `await s.close()` half-closes and waits for the server to end the stream."""
        return AsyncSession(self._stub, self._deadline(timeout))

    async def next_token_probabilities(
        self, prompt: Prompt, top_n: int = 10, full_vocabulary: bool = False, *, timeout: float | None = None
    ) -> Distribution:
        request = pb.NextTokenProbabilitiesRequest(
            prompt=prompt_pb(prompt), top_n=top_n, full_vocabulary=full_vocabulary
        )
        return Distribution.from_pb(await self._call(self._stub.NextTokenProbabilities, request, timeout))

    async def score(
        self,
        prompt: Prompt,
        top_n: int = 0,
        window: int | None = None,
        stride: int | None = None,
        *,
        timeout: float | None = None,
    ) -> Scores:
        request = score_request(prompt, top_n, window, stride)
        return Scores.from_pb(await self._call(self._stub.Score, request, timeout))

    async def tokenize(
        self, text_or_chat: str | Sequence[Mapping[str, str]], *, timeout: float | None = None
    ) -> Tokenized:
        request = tokenize_request(text_or_chat)
        return Tokenized.from_pb(await self._call(self._stub.Tokenize, request, timeout))

    async def detokenize(
        self, ids: Sequence[int], skip_special_tokens: bool = False, *, timeout: float | None = None
    ) -> str:
        request = pb.DetokenizeRequest(ids=ids, skip_special_tokens=skip_special_tokens)
        return (await self._call(self._stub.Detokenize, request, timeout)).text

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return ModelInfo.from_pb(await self._call(self._stub.ModelInfo, pb.ModelInfoRequest(), timeout))

    async def embed(
        self, texts: Sequence[str], layer: int | None = None, *, timeout: float | None = None
    ) -> Embeddings:
        """See `Client.embed`."""
        return Embeddings.from_pb(await self._call(self._stub.Embed, embed_request(texts, layer), timeout))

    async def nearest_tokens(
        self,
        terms: Sequence[Term],
        top_n: int = 10,
        include_terms: bool = False,
        *,
        timeout: float | None = None,
    ) -> NearestTokens:
        """See `Client.nearest_tokens`."""
        request = nearest_tokens_request(terms, top_n, include_terms)
        return NearestTokens.from_pb(await self._call(self._stub.NearestTokens, request, timeout))

    async def attention(
        self,
        prompt: Prompt,
        layer: int | None = None,
        head: int | None = None,
        *,
        timeout: float | None = None,
    ) -> AttentionMap:
        """See `Client.attention`."""
        request = attention_request(prompt, layer, head)
        return AttentionMap.from_pb(await self._call(self._stub.Attention, request, timeout), layer, head)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        return await self._call(self._health, service, timeout)

    async def wait_until_ready(self, timeout: float = 60, service: str = "", interval: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        status = "UNAVAILABLE"
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                status = await self._call(self._health, service, min(remaining, 5.0), wait_for_ready=True)
            except (Unavailable, DeadlineExceeded) as e:
                status = e.code_name
            if status == "SERVING":
                return
            await asyncio.sleep(max(0.0, min(interval, deadline - time.monotonic())))
        raise TimeoutError(f"{self.target} is not SERVING after {timeout} s (last status: {status})")


# ---- sessions ----

_END = object()  # the end of a session's stream (or of its requests)
SessionItem = GenerateEvent | SessionError


class _SessionBase:
    """What the sync and asyncio sessions share: building requests and the end-of-stream bookkeeping."""

    def __init__(self):
        self._closed = False  # half-closed by close(): no more send()
        self._cancelled = False
        self._error: NextwordError | None = None  # the status the stream ended with, when not OK
        self._error_seen = False  # the error was raised to an iterating caller

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the session is closed")

    def _failed(self, e: grpc.RpcError) -> NextwordError | None:
        """The typed error of a stream that ended badly (None when we cancelled it ourselves)."""
        if self._cancelled:
            return None
        self._error = from_rpc_error(e)
        return self._error

    def _take(self, item):
        """What iteration does with a queued item: return an event, or raise at the end / on an error."""
        if isinstance(item, NextwordError):
            self._error_seen = True
            raise item
        return item

    def _raise_unseen(self) -> None:
        if self._error is not None and not self._error_seen:
            self._error_seen = True
            raise self._error


class AsyncSession(_SessionBase):
    """The Session RPC on asyncio (from `AsyncClient.session()`).

    `await send(prompt, **kwargs)` writes one request and returns its id; `async for item in session` yields
    GenerateEvent and SessionError items in arrival order and ends when the server ends the stream (after
    `close()`); a failed stream raises its `NextwordError` there. `close()` half-closes and waits for the end;
    `cancel()` drops the RPC at once. Tasks may send concurrently (an editor answers each keystroke in a task
    of its own): their requests are written one at a time, in the order they were sent.
    """

    def __init__(self, stub: nextword_pb2_grpc.InferenceStub, timeout: float | None):
        super().__init__()
        self._call = stub.Session(timeout=timeout)
        # gRPC takes one write at a time on a stream: a second one while the first is in flight fails the
        # call on this side only (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS, "Internal error from Core"), which
        # the server never hears of, so its generation would run on, orphaned.
        self._writing = asyncio.Lock()
        self._items: asyncio.Queue = asyncio.Queue()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        call, put = self._call, self._items.put_nowait
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                item = session_item(message)
                if item is not None:
                    put(item)
        except grpc.RpcError as e:
            if (error := self._failed(e)) is not None:
                put(error)
        except asyncio.CancelledError:  # cancel(): the call's read raises this
            pass
        finally:
            put(_END)

    async def send(
        self,
        prompt: Prompt,
        *,
        request_id: str = "",
        max_new_tokens: int | None = None,
        top_n: int = 0,
        max_time_ms: int | None = None,
        max_lines: int | None = None,
        **sampling,
    ) -> str:
        """Send one request (the keywords of `AsyncClient.generate`); returns its id (made up when empty).

        Raises:
            RuntimeError: the session is closed.
            NextwordError: the stream has already failed.
        """
        self._check_open()
        request = generate_request(
            prompt,
            max_new_tokens=max_new_tokens,
            top_n=top_n,
            request_id=request_id or new_request_id(),
            sampling=sampling,
            max_time_ms=max_time_ms,
            max_lines=max_lines,
        )
        try:
            async with self._writing:
                await self._call.write(request)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        except asyncio.InvalidStateError:  # the stream ended (cancelled, or the server closed it)
            raise RuntimeError("the session has ended") from None
        return request.request_id

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> SessionItem:
        item = await self._items.get()
        if item is _END:
            self._items.put_nowait(_END)  # every later iteration ends too
            raise StopAsyncIteration
        return self._take(item)

    async def close(self) -> None:
        """Half-close (no more requests) and wait until the server has sent everything; the remaining items
        stay available to iteration. Raises the stream's error if no iteration has raised it yet."""
        if not self._closed:
            self._closed = True
            try:
                async with self._writing:
                    await self._call.done_writing()
            except (grpc.RpcError, asyncio.InvalidStateError):  # already over: the reader has the status
                pass
        await self._reader
        self._raise_unseen()

    def cancel(self) -> None:
        """Drop the RPC now: every request in flight stops at the server's next step; iteration ends."""
        self._cancelled = self._closed = True
        self._call.cancel()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            await self.close()
        else:
            self.cancel()
            await self._reader


class Session(_SessionBase):
    """The Session RPC, blocking (from `Client.session()`): the same methods as `AsyncSession`, served by a
    reader thread and two queues."""

    def __init__(self, stub: nextword_pb2_grpc.InferenceStub, timeout: float | None):
        super().__init__()
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._call = stub.Session(iter(self._requests.get, _END), timeout=timeout)
        self._reader = threading.Thread(target=self._read, name="nextword-session", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for message in self._call:
                item = session_item(message)
                if item is not None:
                    self._items.put(item)
        except grpc.RpcError as e:
            if (error := self._failed(e)) is not None:
                self._items.put(error)
        finally:
            self._items.put(_END)

    def send(
        self,
        prompt: Prompt,
        *,
        request_id: str = "",
        max_new_tokens: int | None = None,
        top_n: int = 0,
        max_time_ms: int | None = None,
        max_lines: int | None = None,
        **sampling,
    ) -> str:
        """See `AsyncSession.send`."""
        self._check_open()
        request = generate_request(
            prompt,
            max_new_tokens=max_new_tokens,
            top_n=top_n,
            request_id=request_id or new_request_id(),
            sampling=sampling,
            max_time_ms=max_time_ms,
            max_lines=max_lines,
        )
        if not self._reader.is_alive():
            self._raise_unseen()
            raise RuntimeError("the session has ended")
        self._requests.put(request)
        return request.request_id

    def __iter__(self) -> Iterator[SessionItem]:
        return self

    def __next__(self) -> SessionItem:
        item = self._items.get()
        if item is _END:
            self._items.put(_END)
            raise StopIteration
        return self._take(item)

    def close(self, timeout: float | None = None) -> None:
        """Half-close and wait (at most `timeout` seconds) for the end of the stream (see
        `AsyncSession.close`)."""
        if not self._closed:
            self._closed = True
            self._requests.put(_END)
        self._reader.join(timeout)
        if self._reader.is_alive():
            raise TimeoutError(f"the session did not end within {timeout} s")
        self._raise_unseen()

    def cancel(self) -> None:
        self._cancelled = self._closed = True
        self._call.cancel()
        self._requests.put(_END)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.cancel()
            self._reader.join()
