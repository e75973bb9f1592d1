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
import itertools
import json
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
    SessionReconnected,
    Tokenized,
    session_item,
)
from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

DEFAULT_TARGET = "127.0.0.1:50051"
INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name
REPLICA_HEADER = "x-nextword-replica"  # initial metadata naming the server replica that answers
# Calls gRPC may send again, to another replica, when one fails with UNAVAILABLE before any response arrived
# (gRPC retries only until the response headers come): every unary RPC (none changes the server's state), and
# Generate, whose server sends nothing before it accepts the request. Not Session: its client reconnects.
RETRIED_METHODS = (
    "Complete",
    "Generate",
    "NextTokenProbabilities",
    "Score",
    "Tokenize",
    "Detokenize",
    "ModelInfo",
    "Embed",
    "NearestTokens",
    "Attention",
)
# Every address the target resolves to (dns:///name:port, ipv4:a:p,b:p, ...) is a replica: calls go round-robin
# to the replicas whose health service says the Inference service is SERVING (a replica loading, draining or
# gone gets none), and a call refused with UNAVAILABLE is retried (docs/deploy.md).
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": INFERENCE_SERVICE},
    "methodConfig": [
        {
            "name": [{"service": INFERENCE_SERVICE, "method": m} for m in RETRIED_METHODS],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.1s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}
DEFAULT_OPTIONS = {
    "grpc.max_receive_message_length": 64 << 20,  # a full-vocabulary distribution is 4 bytes per token
    "grpc.service_config": json.dumps(SERVICE_CONFIG),
}
# A unary call cut off by its replica's death (the connection reset after the request went out, before any
# response: "Stream removed") fails UNAVAILABLE without the retry policy sending it again. It changed nothing
# on any server (every unary RPC is read-only), so the client sends it again, at most this many times.
RESENDS_AFTER_RESET = 2
MAX_RECONNECTS = 3  # a Session's new streams in a row that fail before their first event: then it fails
RECONNECT_BACKOFF_S = 0.2  # before the n-th of them: n times this
SAMPLING_FIELDS = frozenset(pb.SamplingParams.DESCRIPTOR.fields_by_name)

# grpc.health.v1 without depending on grpcio-health-checking (a server extra): HealthCheckRequest is
# {string service = 1} and HealthCheckResponse is {ServingStatus status = 1}, the same wire format as the
# well-known StringValue and Int32Value.
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_STATUSES = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")

Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]


def _cut_off(e: grpc.RpcError, attempt: int) -> bool:
    """Whether a failed unary call should be sent again: its connection reset before any response."""
    return (
        attempt < RESENDS_AFTER_RESET
        and e.code() == grpc.StatusCode.UNAVAILABLE
        and "Stream removed" in (e.details() or "")
    )


def _health_request(service: str) -> bytes:
    return wrappers_pb2.StringValue(value=service).SerializeToString()


def _health_status(data: bytes) -> str:
    status = wrappers_pb2.Int32Value.FromString(data).value
    return HEALTH_STATUSES[status] if 0 <= status < len(HEALTH_STATUSES) else str(status)


def replica_of(metadata) -> str:
    """The replica a call's initial metadata names ("" when the server does not say)."""
    return next((v for k, v in metadata or () if k == REPLICA_HEADER), "")


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


def _host(address: str) -> str:
    """The host of host, host:port, [v6]:port or a bare v6 address."""
    return address.rsplit(":", 1)[0] if address.count(":") == 1 or address.startswith("[") else address


def is_loopback_target(target: str) -> bool:
    """Is every address of `target` on this machine? A target is any gRPC name: host:port, [v6]:port,
    dns:[//authority/]host:port, ipv4:a:p,b:p / ipv6:[a]:p,[b]:p (several replicas), or unix:path."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    scheme, _, rest = target.partition(":")
    if scheme in ("ipv4", "ipv6"):
        return all(is_loopback_host(_host(a)) for a in rest.split(","))
    if scheme == "dns":
        rest = rest[2:].partition("/")[2] if rest.startswith("//") else rest
        return is_loopback_host(_host(rest))
    return is_loopback_host(_host(target))


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

    `target` is any gRPC target (see `is_loopback_target`). The default options balance the calls over every
    address it resolves to (SERVICE_CONFIG: round_robin over the replicas in service, UNAVAILABLE retried);
    `options={"grpc.service_config": ...}` replaces that.

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


# Health probes go to one server directly: the balanced channel sends nothing to a replica that is not SERVING,
# so it could never report NOT_SERVING.
PROBE_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"pick_first": {}}]})


class _ClientBase:
    def __init__(self, target: str, timeout: float | None, aio: bool, options, security: dict):
        self.target, self.timeout = target, timeout
        self._channel = make_channel(target, aio=aio, options=options, **security)
        self._stub = nextword_pb2_grpc.InferenceStub(self._channel)
        self._probe_args = (aio, options, security)
        self._probe_channel = None  # made on the first health call

    @property
    def _health(self):
        if self._probe_channel is None:
            aio, options, security = self._probe_args
            options = dict(options or {}) | {"grpc.service_config": PROBE_SERVICE_CONFIG}
            self._probe_channel = make_channel(self.target, aio=aio, options=options, **security)
        return self._probe_channel.unary_unary(
            HEALTH_CHECK, request_serializer=_health_request, response_deserializer=_health_status
        )

    def _channels(self) -> list:
        return [c for c in (self._channel, self._probe_channel) if c is not None]

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
        super().__init__(target, timeout, False, options, security)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for channel in self._channels():
            channel.close()

    def _call(self, method, request, timeout: float | None, **kwargs):
        for attempt in itertools.count():
            try:
                return method(request, timeout=self._deadline(timeout), **kwargs)
            except grpc.RpcError as e:
                if not _cut_off(e, attempt):
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
        replica = None
        try:
            for event in call:
                if replica is None:  # the headers came with the first event
                    replica = replica_of(call.initial_metadata())
                yield GenerateEvent.from_pb(event, replica)
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
        response, call = self._call(self._stub.Complete.with_call, request, timeout)
        return Completion.from_pb(response, replica_of(call.initial_metadata()))

    def session(self, *, timeout: float | None = None) -> Session:
        """Open a Session: `send()` one request per keystroke, iterate for GenerateEvent / SessionError items
        (and SessionReconnected, when its replica went away and the session moved to another one).

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
        """The grpc.health.v1 status: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN", of one server
        (the first address of the target that answers), asked directly."""
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
        super().__init__(target, timeout, True, options, security)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._channels()))

    async def _call(self, method, request, timeout: float | None, **kwargs):
        for attempt in itertools.count():
            try:
                return await method(request, timeout=self._deadline(timeout), **kwargs)
            except grpc.RpcError as e:
                if not _cut_off(e, attempt):
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
        replica = None
        try:
            async for event in call:
                if replica is None:  # the headers came with the first event
                    replica = replica_of(await call.initial_metadata())
                yield GenerateEvent.from_pb(event, replica)
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
        for attempt in itertools.count():
            call = self._stub.Complete(request, timeout=self._deadline(timeout))
            try:
                response = await call
                return Completion.from_pb(response, replica_of(await call.initial_metadata()))
            except grpc.RpcError as e:
                if not _cut_off(e, attempt):
                    raise from_rpc_error(e) from None

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
SessionItem = GenerateEvent | SessionError | SessionReconnected


class _SessionBase:
    """What the sync and asyncio sessions share: building requests, the end-of-stream bookkeeping, and when to
    reconnect.

    A session's stream stays on one replica (its prefix cache is there). When the stream ends under it, with
    UNAVAILABLE (the replica died or its connection broke) or with OK before the session was closed (the
    replica drained), the session opens a new stream, which the channel's load balancing puts on a replica in
    service, sends the latest request again if its final event had not arrived, and yields a
    SessionReconnected item saying so."""

    def __init__(self, stub: nextword_pb2_grpc.InferenceStub, timeout: float | None):
        self._stub = stub
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._closed = False  # half-closed by close(): no more send()
        self._cancelled = False
        self._error: NextwordError | None = None  # the status the stream ended with, when not OK
        self._error_seen = False  # the error was raised to an iterating caller
        self._unended: dict[str, pb.GenerateRequest] = {}  # requests sent whose final event has not come
        self._latest: str | None = None  # the id of the last request sent
        self.replica = ""  # the replica of the current stream, once its first event named it
        self._reconnects = 0  # new streams in a row that have not yet delivered an event

    def _timeout(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the session is closed")

    def _request(self, prompt: Prompt, request_id: str, **kwargs) -> pb.GenerateRequest:
        self._check_open()
        request = generate_request(prompt, request_id=request_id or new_request_id(), **kwargs)
        self._unended[request.request_id] = request
        self._latest = request.request_id
        return request

    def _item(self, message: pb.SessionEvent):
        """The item of a received message (None for an unknown kind); a final event ends its request."""
        self._reconnects = 0
        item = session_item(message, self.replica)
        if isinstance(item, SessionError) or (item is not None and item.finish is not None):
            self._unended.pop(item.request_id, None)
        return item

    def _failed(self, e: grpc.RpcError) -> NextwordError | None:
        """The typed error of a stream that ended badly (None when we cancelled it ourselves)."""
        if self._cancelled:
            return None
        self._error = from_rpc_error(e)
        return self._error

    def _reconnects_after(self, error: grpc.RpcError | None) -> bool:
        """Does a stream that ended with `error` (None: OK) call for a new one?"""
        if self._cancelled:
            return False
        gone = error is None and not self._closed
        gone |= error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
        if not gone or (self._closed and not self._unended) or self._reconnects >= MAX_RECONNECTS:
            return False
        self._reconnects += 1
        return True

    def _reconnected(
        self, error: grpc.RpcError | None
    ) -> tuple[SessionReconnected, pb.GenerateRequest | None]:
        """What to tell the caller about the new stream, and the request to send on it again."""
        resend = self._unended.get(self._latest)
        superseded = tuple(i for i in self._unended if i != self._latest)
        self._unended = {resend.request_id: resend} if resend else {}
        cause = "OK" if error is None else error.code().name
        item = SessionReconnected(self.replica, cause, resend and resend.request_id, superseded)
        self.replica = ""
        return item, resend

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
    GenerateEvent, SessionError and SessionReconnected items in arrival order and ends when the server ends
    the stream (after `close()`); a failed stream raises its `NextwordError` there. `close()` half-closes and
    waits for the end; `cancel()` drops the RPC at once. Tasks may send concurrently (an editor answers each
    keystroke in a task of its own): their requests are written one at a time, in the order they were sent.
    """

    def __init__(self, stub: nextword_pb2_grpc.InferenceStub, timeout: float | None):
        super().__init__(stub, timeout)
        self._call = stub.Session(timeout=timeout)
        # gRPC takes one write at a time on a stream: a second one while the first is in flight fails the
        # call on this side only (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS, "Internal error from Core"), which
        # the server never hears of, so its generation would run on, orphaned.
        self._writing = asyncio.Lock()
        self._items: asyncio.Queue = asyncio.Queue()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        put = self._items.put_nowait
        try:
            while True:
                call, error = self._call, None
                try:
                    while (message := await call.read()) is not grpc.aio.EOF:
                        if not self.replica:  # the headers came with the first event
                            self.replica = replica_of(await call.initial_metadata())
                        if (item := self._item(message)) is not None:
                            put(item)
                except grpc.RpcError as e:
                    error = e
                if not self._reconnects_after(error):
                    if error is not None and (failure := self._failed(error)) is not None:
                        put(failure)
                    return
                await asyncio.sleep(RECONNECT_BACKOFF_S * (self._reconnects - 1))
                item, resend = self._reconnected(error)
                self._call = self._stub.Session(timeout=self._timeout())
                put(item)
                try:
                    async with self._writing:
                        if resend is not None:
                            await self._call.write(resend)
                        if self._closed:
                            await self._call.done_writing()
                except (grpc.RpcError, asyncio.InvalidStateError):  # over already: read() says how
                    pass
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
        request = self._request(
            prompt,
            request_id,
            max_new_tokens=max_new_tokens,
            top_n=top_n,
            sampling=sampling,
            max_time_ms=max_time_ms,
            max_lines=max_lines,
        )
        try:
            async with self._writing:
                await self._call.write(request)
        except (grpc.RpcError, asyncio.InvalidStateError) as e:  # the stream ended under us
            if not self._reader.done():  # the reader reconnects (sending this request) or reports why not
                return request.request_id
            if isinstance(e, grpc.RpcError):
                raise from_rpc_error(e) from None
            self._raise_unseen()
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
        self._reader.cancel()  # also when it waits to reconnect

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            await self.close()
        else:
            self.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


class Session(_SessionBase):
    """The Session RPC, blocking (from `Client.session()`): the same methods as `AsyncSession`, served by a
    reader thread and two queues."""

    def __init__(self, stub: nextword_pb2_grpc.InferenceStub, timeout: float | None):
        super().__init__(stub, timeout)
        self._lock = threading.Lock()  # send() against a reconnect: each request goes to exactly one stream
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._requests, self._call = self._open(timeout)
        self._reader = threading.Thread(target=self._read, name="nextword-session", daemon=True)
        self._reader.start()

    def _open(self, timeout: float | None):
        requests: queue.SimpleQueue = queue.SimpleQueue()
        return requests, self._stub.Session(iter(requests.get, _END), timeout=timeout)

    def _read(self) -> None:
        try:
            while True:
                call, error = self._call, None
                try:
                    for message in call:
                        if not self.replica:  # the headers came with the first event
                            self.replica = replica_of(call.initial_metadata())
                        if (item := self._item(message)) is not None:
                            self._items.put(item)
                except grpc.RpcError as e:
                    error = e
                with self._lock:
                    if not self._reconnects_after(error):
                        if error is not None and (failure := self._failed(error)) is not None:
                            self._items.put(failure)
                        return
                time.sleep(RECONNECT_BACKOFF_S * (self._reconnects - 1))
                with self._lock:
                    item, resend = self._reconnected(error)
                    self._requests.put(_END)  # the old stream's request iterator ends
                    self._requests, self._call = self._open(self._timeout())
                    if resend is not None:
                        self._requests.put(resend)
                    if self._closed:
                        self._requests.put(_END)
                self._items.put(item)
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
        with self._lock:
            self._check_open()
            if not self._reader.is_alive():
                self._raise_unseen()
                raise RuntimeError("the session has ended")
            request = self._request(
                prompt,
                request_id,
                max_new_tokens=max_new_tokens,
                top_n=top_n,
                sampling=sampling,
                max_time_ms=max_time_ms,
                max_lines=max_lines,
            )
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
        with self._lock:
            if not self._closed:
                self._closed = True
                self._requests.put(_END)
        self._reader.join(timeout)
        if self._reader.is_alive():
            raise TimeoutError(f"the session did not end within {timeout} s")
        self._raise_unseen()

    def cancel(self) -> None:
        with self._lock:
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
