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
    Completion,
    Distribution,
    Finish,
    GenerateEvent,
    Limits,
    ModelInfo,
    SessionError,
    SpecialToken,
    Timings,
    Token,
    Tokenized,
    TokenProb,
    Usage,
)

__all__ = [
    "DEFAULT_TARGET",
    "AsyncClient",
    "AsyncSession",
    "Cancelled",
    "Client",
    "Completion",
    "DeadlineExceeded",
    "Distribution",
    "Finish",
    "GenerateEvent",
    "Internal",
    "InvalidArgument",
    "Limits",
    "ModelInfo",
    "NextwordError",
    "ResourceExhausted",
    "Session",
    "SessionError",
    "SpecialToken",
    "Timings",
    "Token",
    "TokenProb",
    "Tokenized",
    "Unavailable",
    "Usage",
    "from_rpc_error",
]
