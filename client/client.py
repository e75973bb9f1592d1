"""The thin client: a context-managed channel and stub, one method per RPC, small frozen dataclasses out.

    with Client("127.0.0.1:50051") as c:
        for event in c.generate("The capital of France is", max_new_tokens=8):
            print(event.text, end="", flush=True)

`AsyncClient` has the same methods on grpc.aio. Every failed call raises a typed `NextwordError`.
"""

from __future__ import annotations

import asyncio
import operator
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import grpc
from google.protobuf import wrappers_pb2

from nextword.client.errors import DeadlineExceeded, Unavailable, from_rpc_error
from nextword.client.types import Completion, Distribution, GenerateEvent, ModelInfo, Tokenized
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
    prompt: Prompt, *, max_new_tokens: int | None, top_n: int, request_id: str, sampling: Mapping
) -> pb.GenerateRequest:
    request = pb.GenerateRequest(
        request_id=request_id, prompt=prompt_pb(prompt), sampling=sampling_pb(sampling), top_n=top_n
    )
    if max_new_tokens is not None:
        request.max_new_tokens = max_new_tokens
    return request


def tokenize_request(text_or_chat: str | Sequence[Mapping[str, str]]) -> pb.TokenizeRequest:
    if isinstance(text_or_chat, str):
        return pb.TokenizeRequest(text=text_or_chat)
    return pb.TokenizeRequest(chat=chat_pb(text_or_chat))


def channel_options(options) -> list[tuple[str, object]]:
    """The default options, overridden by `options` (a dict or a list of (name, value) pairs)."""
    return list((DEFAULT_OPTIONS | dict(options or {})).items())


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

    `options` are gRPC channel options (dict or pairs) added to DEFAULT_OPTIONS.
    """

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = None, options=None):
        super().__init__(target, timeout)
        self._channel = grpc.insecure_channel(target, options=channel_options(options))
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
        **sampling,
    ) -> Iterator[GenerateEvent]:
        """Stream one event per generated token; the last event carries `finish`.

        Args:
            prompt: text, a list of token ids, or a list of {"role": ..., "content": ...} chat messages.
            max_new_tokens: tokens to generate at most (None: the server's default).
            top_n: alternatives reported with each token.
            request_id: echoed in every event (the server makes one up when empty).
            timeout: deadline of the whole stream, in seconds (None: the client's default).
            **sampling: SamplingParams fields (temperature, top_k, top_p, min_p, repetition_penalty,
                presence_penalty, frequency_penalty, logit_bias, seed, stop, stop_token_ids, ignore_eos);
                None leaves a field to the server's default.

        Returns:
            An iterator of GenerateEvent. The RPC starts at the first `next()`; closing the iterator (or
            leaving a for loop early) cancels it.
        """
        request = generate_request(
            prompt, max_new_tokens=max_new_tokens, top_n=top_n, request_id=request_id, sampling=sampling
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
        **sampling,
    ) -> Completion:
        """The same as `generate`, answered once with the whole result."""
        request = generate_request(
            prompt, max_new_tokens=max_new_tokens, top_n=top_n, request_id=request_id, sampling=sampling
        )
        return Completion.from_pb(self._call(self._stub.Complete, request, timeout))

    def next_token_probabilities(
        self, prompt: Prompt, top_n: int = 10, full_vocabulary: bool = False, *, timeout: float | None = None
    ) -> Distribution:
        """The distribution of the token after `prompt` (with `full_vocabulary`: every log-probability)."""
        request = pb.NextTokenProbabilitiesRequest(
            prompt=prompt_pb(prompt), top_n=top_n, full_vocabulary=full_vocabulary
        )
        return Distribution.from_pb(self._call(self._stub.NextTokenProbabilities, request, timeout))

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

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = None, options=None):
        super().__init__(target, timeout)
        self._channel = grpc.aio.insecure_channel(target, options=channel_options(options))
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
        **sampling,
    ) -> AsyncIterator[GenerateEvent]:
        """See `Client.generate`. `aclose()` (or `contextlib.aclosing`) cancels the RPC at once; an iterator
        left behind by `break` is cancelled when asyncio finalizes it."""
        request = generate_request(
            prompt, max_new_tokens=max_new_tokens, top_n=top_n, request_id=request_id, sampling=sampling
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
        **sampling,
    ) -> Completion:
        request = generate_request(
            prompt, max_new_tokens=max_new_tokens, top_n=top_n, request_id=request_id, sampling=sampling
        )
        return Completion.from_pb(await self._call(self._stub.Complete, request, timeout))

    async def next_token_probabilities(
        self, prompt: Prompt, top_n: int = 10, full_vocabulary: bool = False, *, timeout: float | None = None
    ) -> Distribution:
        request = pb.NextTokenProbabilitiesRequest(
            prompt=prompt_pb(prompt), top_n=top_n, full_vocabulary=full_vocabulary
        )
        return Distribution.from_pb(await self._call(self._stub.NextTokenProbabilities, request, timeout))

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
