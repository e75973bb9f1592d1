"""What the client returns: small frozen dataclasses built from the protobuf messages (`from_pb`), so no
protobuf type leaks out of the client. `to_dict()` gives plain JSON-ready values (used by `--json`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from nextword.v1 import nextword_pb2 as pb


def _plain(value):
    """Dataclasses, tuples and arrays as dicts, lists and numbers."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


class _ToDict:
    def to_dict(self) -> dict:
        """This object as plain dicts, lists, strings and numbers (ready for `json.dumps`)."""
        return _plain(self)


def finish_reason_name(reason: int) -> str:
    """FINISH_REASON_STOP_TOKEN -> "stop_token" (a value this client does not know -> its number)."""
    try:
        return pb.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()
    except ValueError:
        return str(reason)


@dataclass(frozen=True)
class TokenProb(_ToDict):
    token_id: int
    text: str
    prob: float
    logprob: float

    @classmethod
    def from_pb(cls, m: pb.TokenProb) -> TokenProb:
        return cls(m.token_id, m.text, m.prob, m.logprob)


@dataclass(frozen=True)
class SpecialToken(_ToDict):
    id: int
    text: str

    @classmethod
    def from_pb(cls, m: pb.SpecialToken) -> SpecialToken:
        return cls(m.id, m.text)


@dataclass(frozen=True)
class Token(_ToDict):
    id: int
    text: str  # the token's own text; GenerateEvent.text is the safe text to append
    prob: float
    logprob: float
    top: tuple[TokenProb, ...]  # the top_n alternatives, most likely first
    index: int  # position in the output, from 0
    elapsed_ms: float  # since the previous token (the first: since the request arrived)

    @classmethod
    def from_pb(cls, m: pb.Token) -> Token:
        top = tuple(TokenProb.from_pb(t) for t in m.top)
        return cls(m.id, m.text, m.prob, m.logprob, top, m.index, m.elapsed_ms)


@dataclass(frozen=True)
class Usage(_ToDict):
    prompt_tokens: int
    generated_tokens: int
    cached_prompt_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache


@dataclass(frozen=True)
class Timings(_ToDict):
    queue_ms: float
    prefill_ms: float
    ttft_ms: float
    mean_itl_ms: float
    total_ms: float

    @property
    def tokens_per_s(self) -> float:
        """Decode speed after the first token (0 when unknown)."""
        return 1000.0 / self.mean_itl_ms if self.mean_itl_ms > 0 else 0.0


@dataclass(frozen=True)
class Finish(_ToDict):
    # "length", "eos", "stop", "stop_token", "cancelled", "time" (max_time_ms), "lines" (max_lines) or
    # "superseded" (a newer request of the same Session replaced this one)
    reason: str
    stop: str  # the matched stop string or stop token text; "" otherwise
    usage: Usage
    timings: Timings
    seed: int

    @classmethod
    def from_pb(cls, m: pb.Finish) -> Finish:
        u, t = m.usage, m.timings
        return cls(
            reason=finish_reason_name(m.reason),
            stop=m.stop,
            usage=Usage(u.prompt_tokens, u.generated_tokens, u.cached_prompt_tokens),
            timings=Timings(t.queue_ms, t.prefill_ms, t.ttft_ms, t.mean_itl_ms, t.total_ms),
            seed=m.seed,
        )


@dataclass(frozen=True)
class GenerateEvent(_ToDict):
    request_id: str
    token: Token | None  # None on a final event that generated nothing
    text: str  # UTF-8-safe text to append (can be empty)
    finish: Finish | None  # set on the last event only
    replica: str = ""  # the server replica that produced it (its x-nextword-replica metadata; "" if unnamed)

    @classmethod
    def from_pb(cls, m: pb.GenerateEvent, replica: str = "") -> GenerateEvent:
        token = Token.from_pb(m.token) if m.HasField("token") else None
        finish = Finish.from_pb(m.finish) if m.HasField("finish") else None
        return cls(m.request_id, token, m.text, finish, replica)


@dataclass(frozen=True)
class SessionError(_ToDict):
    """A request of a Session that failed in-band; the session goes on."""

    request_id: str
    code_name: str  # the status the same request would get from Generate, e.g. "INVALID_ARGUMENT"
    message: str
    field: str | None  # the offending field, for INVALID_ARGUMENT; None otherwise

    @classmethod
    def from_pb(cls, m: pb.SessionError) -> SessionError:
        return cls(m.request_id, m.code, m.message, m.field or None)


@dataclass(frozen=True)
class SessionReconnected(_ToDict):
    """The Session's stream ended under it (its replica died, or drained and closed the stream) and the client
    opened a new one, which the channel's load balancing puts on a replica in service; the session goes on.

    `resent` is the latest request, sent again on the new stream because its final event had not arrived: its
    events start over (drop what it had produced so far). `superseded` are earlier requests that had not
    ended either: the latest one supersedes them, as the server would have said."""

    previous_replica: str  # "" when the old stream never named its replica
    cause: str  # "UNAVAILABLE" (the replica went away) or "OK" (it ended the stream while draining)
    resent: str | None
    superseded: tuple[str, ...] = ()

    @property
    def request_id(self) -> str:
        return self.resent or ""


def session_item(m: pb.SessionEvent, replica: str = "") -> GenerateEvent | SessionError | None:
    """A SessionEvent as a GenerateEvent or a SessionError (None: an event kind this client does not know)."""
    kind = m.WhichOneof("event")
    if kind == "generate":
        return GenerateEvent.from_pb(m.generate, replica)
    if kind == "error":
        return SessionError.from_pb(m.error)
    return None


@dataclass(frozen=True)
class Completion(_ToDict):
    request_id: str
    text: str
    tokens: tuple[Token, ...]
    finish: Finish
    replica: str = ""  # the server replica that answered (its x-nextword-replica metadata; "" if unnamed)

    @classmethod
    def from_pb(cls, m: pb.CompleteResponse, replica: str = "") -> Completion:
        tokens = tuple(Token.from_pb(t) for t in m.tokens)
        return cls(m.request_id, m.text, tokens, Finish.from_pb(m.finish), replica)


@dataclass(frozen=True)
class Distribution(_ToDict):
    top: tuple[TokenProb, ...]  # most likely first
    logprobs: np.ndarray | None = field(compare=False)  # float32 [vocab_size] with full_vocabulary, else None
    prompt_tokens: int
    vocab_size: int

    @classmethod
    def from_pb(cls, m: pb.NextTokenProbabilitiesResponse) -> Distribution:
        logprobs = np.frombuffer(m.logprobs, dtype="<f4") if m.logprobs else None  # read-only view
        return cls(tuple(TokenProb.from_pb(t) for t in m.top), logprobs, m.prompt_tokens, m.vocab_size)


@dataclass(frozen=True)
class ScoredToken(_ToDict):
    index: int  # position in the prompt (the first token, without context, is never scored)
    id: int
    text: str
    logprob: float  # log p(token | the tokens before it), plain softmax of the logits
    rank: int  # 1 = the model's top choice
    top: tuple[TokenProb, ...]  # with top_n

    @classmethod
    def from_pb(cls, m: pb.ScoredToken) -> ScoredToken:
        return cls(m.index, m.id, m.text, m.logprob, m.rank, tuple(TokenProb.from_pb(t) for t in m.top))


@dataclass(frozen=True)
class Scores(_ToDict):
    tokens: tuple[ScoredToken, ...]
    sum_logprob: float
    perplexity: float
    prompt_tokens: int
    window: int
    stride: int
    windows: int

    @classmethod
    def from_pb(cls, m: pb.ScoreResponse) -> Scores:
        tokens = tuple(ScoredToken.from_pb(t) for t in m.tokens)
        return cls(tokens, m.sum_logprob, m.perplexity, m.prompt_tokens, m.window, m.stride, m.windows)


@dataclass(frozen=True)
class Tokenized(_ToDict):
    ids: tuple[int, ...]
    tokens: tuple[str, ...]  # each token's own text, one per id

    @classmethod
    def from_pb(cls, m: pb.TokenizeResponse) -> Tokenized:
        return cls(tuple(m.ids), tuple(m.tokens))


@dataclass(frozen=True)
class Limits(_ToDict):
    max_top_n: int
    max_stop_strings: int
    max_stop_chars: int
    max_request_bytes: int
    kv_cache_tokens: int
    max_queue: int = 0  # requests that may wait for admission (beyond it: RESOURCE_EXHAUSTED at once)
    max_batch_tokens: int = 0  # tokens processed per engine step at most
    max_embed_texts: int = 0  # texts per Embed call
    max_embed_tokens: int = 0  # tokens of all the texts of one Embed call together
    max_attention_tokens: int = 0  # prompt tokens of an Attention call


def sampling_dict(m: pb.SamplingParams) -> dict:
    """The fields of a SamplingParams that are set, by name."""
    out = {}
    for f in m.DESCRIPTOR.fields:
        if f.has_presence and m.HasField(f.name):
            value = getattr(m, f.name)
            # a float32 field read back as its shortest decimal: 0.7, not 0.699999988079071
            out[f.name] = float(str(np.float32(value))) if f.cpp_type == f.CPPTYPE_FLOAT else value
    if m.logit_bias:
        out["logit_bias"] = dict(m.logit_bias)
    if m.stop:
        out["stop"] = list(m.stop)
    if m.stop_token_ids:
        out["stop_token_ids"] = list(m.stop_token_ids)
    if m.ignore_eos:
        out["ignore_eos"] = True
    return out


@dataclass(frozen=True)
class ModelInfo(_ToDict):
    model_id: str
    architecture: str
    vocab_size: int
    context_length: int
    eos_token_ids: tuple[int, ...]
    special_tokens: tuple[SpecialToken, ...]
    has_chat_template: bool
    weights_format: str
    parameters: int
    kernel_path: str  # "avx2" or "portable"
    instruction_set: str  # e.g. "avx2 (LLVM cpu znver3)"
    kv_cache_dtype: str  # f32 or f16
    limits: Limits
    defaults: dict = field(hash=False)  # the sampling defaults by field name, plus "max_new_tokens"

    @classmethod
    def from_pb(cls, m: pb.ModelInfoResponse) -> ModelInfo:
        lim = m.limits
        limits = Limits(
            lim.max_top_n,
            lim.max_stop_strings,
            lim.max_stop_chars,
            lim.max_request_bytes,
            lim.kv_cache_tokens,
            lim.max_queue,
            lim.max_batch_tokens,
            lim.max_embed_texts,
            lim.max_embed_tokens,
            lim.max_attention_tokens,
        )
        defaults = sampling_dict(m.defaults.sampling) | {"max_new_tokens": m.defaults.max_new_tokens}
        return cls(
            model_id=m.model_id,
            architecture=m.architecture,
            vocab_size=m.vocab_size,
            context_length=m.context_length,
            eos_token_ids=tuple(m.eos_token_ids),
            special_tokens=tuple(SpecialToken.from_pb(t) for t in m.special_tokens),
            has_chat_template=m.has_chat_template,
            weights_format=m.weights_format,
            parameters=m.parameters,
            kernel_path=m.kernel_path,
            instruction_set=m.instruction_set,
            kv_cache_dtype=m.kv_cache_dtype,
            limits=limits,
            defaults=defaults,
        )


def _floats(data: bytes, *shape: int) -> np.ndarray:
    """Packed little-endian float32 as a read-only array of `shape`."""
    return np.frombuffer(data, dtype="<f4").reshape(shape)


@dataclass(frozen=True)
class TextEmbedding(_ToDict):
    """One text of an Embed call."""

    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]  # each token's own text
    token_embeddings: np.ndarray | None = field(compare=False)  # float32 [len(tokens), dim] with a layer
    sentence: np.ndarray = field(compare=False)  # float32 [dim], unit length: cosine similarity = dot product

    @classmethod
    def from_pb(cls, m: pb.TextEmbedding, dim: int) -> TextEmbedding:
        rows = _floats(m.token_embeddings, len(m.token_ids), dim) if m.token_embeddings else None
        return cls(tuple(m.token_ids), tuple(m.tokens), rows, _floats(m.sentence_embedding, dim))


@dataclass(frozen=True)
class Embeddings(_ToDict):
    """The result of an Embed call: one TextEmbedding per text, in order."""

    texts: tuple[TextEmbedding, ...]
    dim: int  # the model's hidden size
    num_layers: int

    @classmethod
    def from_pb(cls, m: pb.EmbedResponse) -> Embeddings:
        return cls(tuple(TextEmbedding.from_pb(t, m.dim) for t in m.texts), m.dim, m.num_layers)

    @property
    def sentences(self) -> np.ndarray:
        """The sentence embeddings stacked: float32 [len(texts), dim]."""
        return np.stack([t.sentence for t in self.texts]) if self.texts else np.zeros((0, self.dim), "<f4")


@dataclass(frozen=True)
class TokenSimilarity(_ToDict):
    token_id: int
    text: str
    cosine: float

    @classmethod
    def from_pb(cls, m: pb.TokenSimilarity) -> TokenSimilarity:
        return cls(m.token_id, m.text, m.cosine)


@dataclass(frozen=True)
class NearestTokens(_ToDict):
    terms: tuple[TokenSimilarity, ...]  # the token each term resolved to, with its cosine to the query
    nearest: tuple[TokenSimilarity, ...]  # most similar first

    @classmethod
    def from_pb(cls, m: pb.NearestTokensResponse) -> NearestTokens:
        return cls(
            tuple(TokenSimilarity.from_pb(t) for t in m.terms),
            tuple(TokenSimilarity.from_pb(t) for t in m.nearest),
        )


@dataclass(frozen=True)
class AttentionMap(_ToDict):
    """Attention weights over a prompt: weights[i, j] is how much token i attends to token j (rows sum to 1,
    zero above the diagonal), for one layer/head or the mean over them."""

    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]  # each token's own text
    weights: np.ndarray = field(compare=False)  # float32 [T, T], row = query token
    layer: int | None  # 1..num_layers, or None: the mean over all layers
    head: int | None  # 0..num_heads-1, or None: the mean over all heads
    num_layers: int
    num_heads: int

    @classmethod
    def from_pb(cls, m: pb.AttentionResponse, layer: int | None, head: int | None) -> AttentionMap:
        T = len(m.token_ids)
        weights = _floats(m.weights, T, T)
        return cls(tuple(m.token_ids), tuple(m.tokens), weights, layer, head, m.num_layers, m.num_heads)
