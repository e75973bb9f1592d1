"""nextword.client: the thin gRPC client (grpcio, grpcio-status, protobuf and numpy only; never numba).

from nextword.client import Client

with Client("127.0.0.1:50051") as c:
    print(c.complete("The capital of France is", max_new_tokens=8).text)

`nextword.client.load` is the load generator behind `nextword load` (`run_load(LoadConfig(...))`).
"""

from nextword.client.client import DEFAULT_TARGET, AsyncClient, AsyncSession, Client, Session
from nextword.client.errors import (
    Cancelled,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NextwordError,
    ResourceExhausted,
    Unavailable,
    from_rpc_error,
)
from nextword.client.types import (
    AttentionMap,
    Completion,
    Distribution,
    Embeddings,
    Finish,
    GenerateEvent,
    Limits,
    ModelInfo,
    NearestTokens,
    ScoredToken,
    Scores,
    SessionError,
    SessionReconnected,
    SpecialToken,
    TextEmbedding,
    Timings,
    Token,
    Tokenized,
    TokenProb,
    TokenSimilarity,
    Usage,
)

__all__ = [
    "DEFAULT_TARGET",
    "AsyncClient",
    "AsyncSession",
    "AttentionMap",
    "Cancelled",
    "Client",
    "Completion",
    "DeadlineExceeded",
    "Distribution",
    "Embeddings",
    "Finish",
    "GenerateEvent",
    "Internal",
    "InvalidArgument",
    "Limits",
    "ModelInfo",
    "NearestTokens",
    "NextwordError",
    "ResourceExhausted",
    "ScoredToken",
    "Scores",
    "Session",
    "SessionError",
    "SessionReconnected",
    "SpecialToken",
    "TextEmbedding",
    "Timings",
    "Token",
    "TokenProb",
    "TokenSimilarity",
    "Tokenized",
    "Unavailable",
    "Usage",
    "from_rpc_error",
]
