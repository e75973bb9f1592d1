"""TLS, mutual TLS and bearer tokens, end to end over loopback with certificates made here (cryptography).

One tiny-model server with TLS + token and one with mutual TLS + token; every client command and `nextword
load` run against the first with --tls-ca and a token.
"""

import datetime
import ipaddress
import json
import logging
import socket
import time
import urllib.request

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from servers import running_server

from nextword.client import Client, NextwordError, Unavailable
from nextword.client.cli import main as cli_main
from nextword.client.client import make_channel
from nextword.server.serve import ServerConfig

TOKEN = "s3cret-token-for-tests"


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer_name, issuer_key, *, ca: bool, sans=()):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path, cert=None, key=None):
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, as PEM files."""
    d = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nextword test CA")])
    ca = _cert("nextword test CA", ca_key, ca_name, ca_key, ca=True)
    server_key, client_key = _key(), _key()
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = _cert("localhost", server_key, ca_name, ca_key, ca=False, sans=sans)
    client = _cert("test client", client_key, ca_name, ca_key, ca=False)
    # a second CA the server does not trust: its client certificate must be refused
    other_key = _key()
    other_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stranger CA")])
    stranger = _cert("stranger", client_key, other_name, other_key, ca=False)
    return {
        "ca": _write(d / "ca.pem", ca),
        "server_cert": _write(d / "server.pem", server),
        "server_key": _write(d / "server.key", key=server_key),
        "client_cert": _write(d / "client.pem", client),
        "client_key": _write(d / "client.key", key=client_key),
        "stranger_cert": _write(d / "stranger.pem", stranger),
        "token_file": _token_file(d / "token"),
    }


def _token_file(path):
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture(scope="module")
def tls_server(tiny_folder, pki):
    with running_server(
        model=tiny_folder,
        weights="f32",
        tls_cert=pki["server_cert"],
        tls_key=pki["server_key"],
        token=TOKEN,
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def mtls_server(tiny_folder, pki):
    with running_server(
        model=tiny_folder,
        weights="f32",
        tls_cert=pki["server_cert"],
        tls_key=pki["server_key"],
        tls_client_ca=pki["ca"],
        token=TOKEN,
    ) as srv:
        yield srv


def target(srv) -> str:
    return f"127.0.0.1:{srv.port}"


def test_tls_with_token_works(tls_server, pki):
    with Client(target(tls_server), tls_ca=pki["ca"], token=TOKEN, timeout=30) as c:
        assert c.health() == "SERVING"
        events = list(c.generate("Hello", max_new_tokens=3, temperature=0))
        assert events[-1].finish is not None and sum(e.token is not None for e in events) >= 1
        assert c.tokenize("Hello").ids


def test_plaintext_client_is_refused(tls_server):
    with Client(target(tls_server), timeout=10) as c, pytest.raises(Unavailable):
        c.health()


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN + "x", ""])
def test_missing_or_wrong_token_is_unauthenticated(tls_server, pki, token):
    with Client(target(tls_server), tls_ca=pki["ca"], token=token or None, timeout=10) as c:
        for call in (lambda: c.tokenize("Hello"), lambda: list(c.generate("Hello", max_new_tokens=2))):
            with pytest.raises(NextwordError) as e:
                call()
            assert e.value.code_name == "UNAUTHENTICATED"


def test_health_needs_no_token(tls_server, pki):
    with Client(target(tls_server), tls_ca=pki["ca"], timeout=10) as c:
        assert c.health() == "SERVING"


def test_mtls_refuses_a_client_without_a_certificate(mtls_server, pki):
    with (
        Client(target(mtls_server), tls_ca=pki["ca"], token=TOKEN, timeout=10) as c,
        pytest.raises(Unavailable),
    ):
        c.health()
    with (
        Client(
            target(mtls_server),
            tls_ca=pki["ca"],
            tls_cert=pki["stranger_cert"],
            tls_key=pki["client_key"],
            token=TOKEN,
            timeout=10,
        ) as c,
        pytest.raises(Unavailable),
    ):  # a certificate from a CA the server does not trust
        c.health()
    with Client(
        target(mtls_server),
        tls_ca=pki["ca"],
        tls_cert=pki["client_cert"],
        tls_key=pki["client_key"],
        token=TOKEN,
        timeout=10,
    ) as c:
        assert c.health() == "SERVING" and c.tokenize("Hello").ids


def test_a_token_is_never_sent_in_clear_to_another_machine():
    with pytest.raises(ValueError, match="without TLS"):
        make_channel("10.1.2.3:50051", aio=False, token=TOKEN)
    make_channel("127.0.0.1:50051", aio=False, token=TOKEN).close()  # loopback: local credentials


def _security_flags(srv, pki):
    return ["--target", target(srv), "--tls-ca", str(pki["ca"]), "--token-file", str(pki["token_file"])]


CLIENT_COMMANDS = {
    "complete": ["complete", "Hello", "--max-new-tokens", "3"],
    "probs": ["probs", "Hello", "--top-n", "3"],
    "tokenize": ["tokenize", "Hello world"],
    "detokenize": ["detokenize", "40", "41"],
    "info": ["info"],
    "similar": ["similar", "fox", "dog", "cat"],
    "analogy": ["analogy", "fox", "dog", "cat", "--top-n", "3"],
    "explain": ["explain", "The quick brown fox", "--top-n", "2"],
    "chat": ["chat", "--max-new-tokens", "3"],
}


@pytest.mark.parametrize("name", list(CLIENT_COMMANDS))
def test_every_client_command_works_with_tls_and_token(name, tls_server, pki, capsys, monkeypatch):
    if name == "chat":
        monkeypatch.setattr("sys.stdin", __import__("io").StringIO("Hello\n/exit\n"))
    assert cli_main(CLIENT_COMMANDS[name] + _security_flags(tls_server, pki)) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "error" not in err
    # the same command without the token is refused, with a hint
    monkeypatch.delenv("NEXTWORD_TOKEN", raising=False)
    if name == "chat":
        monkeypatch.setattr("sys.stdin", __import__("io").StringIO("Hello\n"))
    flags = ["--target", target(tls_server), "--tls-ca", str(pki["ca"])]
    assert cli_main(CLIENT_COMMANDS[name] + flags) == 1
    err = capsys.readouterr().err
    assert "UNAUTHENTICATED" in err and "--token" in err


def test_load_works_with_tls_and_token(tls_server, pki, capsys, monkeypatch):
    monkeypatch.setenv("NEXTWORD_TOKEN", TOKEN)  # the token from the environment this time
    argv = ["load", "--target", target(tls_server), "--tls-ca", str(pki["ca"])]
    argv += ["--num-requests", "4", "--concurrency", "2", "--prompt-tokens", "8", "--output-tokens", "4"]
    assert cli_main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["completed"] == 4 and not result["errors"]


def test_reflection_can_be_turned_off(tiny_folder):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    def services(srv):
        with grpc.insecure_channel(target(srv)) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            try:
                response = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
            except grpc.RpcError as e:
                return e.code()
            return {s.name for s in response.list_services_response.service}

    with running_server(model=tiny_folder, weights="f32", reflection=False) as srv:
        assert services(srv) == grpc.StatusCode.UNIMPLEMENTED


def test_metrics_stay_on_loopback_when_grpc_listens_everywhere(tiny_folder):
    with running_server(model=tiny_folder, weights="f32", host="0.0.0.0") as srv:
        with Client(f"127.0.0.2:{srv.port}", timeout=10) as c:  # gRPC: on every address
            assert c.health() == "SERVING"
        url = f"http://127.0.0.1:{srv.metrics_port}/metrics"
        assert b"nextword_requests" in urllib.request.urlopen(url, timeout=10).read()
        with pytest.raises(OSError):  # metrics: 127.0.0.1 only, not 127.0.0.2
            socket.create_connection(("127.0.0.2", srv.metrics_port), timeout=5).close()


def test_exposed_in_clear_is_what_the_warning_checks(tiny_folder):
    config = ServerConfig(model=tiny_folder)
    assert not config.exposed_in_clear  # loopback
    assert ServerConfig(model=tiny_folder, host="0.0.0.0").exposed_in_clear
    assert ServerConfig(model=tiny_folder, host="0.0.0.0", tls_cert="c", token="t").exposed_in_clear is False
    assert ServerConfig(model=tiny_folder, host="0.0.0.0", token="t").exposed_in_clear
    assert TOKEN not in ServerConfig(model=tiny_folder, token=TOKEN).describe()  # never printed


def test_one_sanitized_log_line_per_request_for_every_rpc(tls_server, pki, caplog):
    forged = (
        "abc\x1b[2J\n2026-01-01 00:00:00 INFO nextword.requests: Generate id=admin status=OK" + "x" * 45
    )  # 124 characters: request ids longer than 128 are refused (server/guard.py)
    with caplog.at_level(logging.INFO, logger="nextword.requests"):
        with Client(target(tls_server), tls_ca=pki["ca"], token=TOKEN, timeout=30) as c:
            list(c.generate("Hello", max_new_tokens=2, request_id=forged))
            c.next_token_probabilities("Hello", top_n=2)
            c.tokenize("Hello")
            c.model_info()
            with pytest.raises(NextwordError):
                c.generate("Hello", max_new_tokens=2, top_p=5.0, request_id="bad-top-p").__next__()
        with (
            Client(target(tls_server), tls_ca=pki["ca"], token="wrong", timeout=10) as c,
            pytest.raises(NextwordError),
        ):
            c.tokenize("Hello")
        for _ in range(100):  # the server logs once the call has ended, on its own thread: poll
            lines = [r.getMessage() for r in caplog.records if r.name == "nextword.requests"]
            if len(lines) >= 7:
                break
            time.sleep(0.05)
    assert all("\n" not in line and "\x1b" not in line for line in lines)
    generate = [line for line in lines if line.startswith("Generate ")]
    assert len(generate) == 2
    assert generate[0].startswith("Generate id=abc\\x1b[2J\\n2026-01-01") and "... status=OK " in generate[0]
    assert "x" * 40 not in generate[0] and "generated tokens" in generate[0]  # the id is capped
    assert "id=bad-top-p status=INVALID_ARGUMENT" in generate[1]
    assert any(line.startswith("NextTokenProbabilities ") and "status=OK" in line for line in lines)
    assert sum(line.startswith("Tokenize ") for line in lines) == 2
    assert any(line.startswith("Tokenize ") and "status=UNAUTHENTICATED" in line for line in lines)
    assert any(line.startswith("ModelInfo ") and "status=OK" in line for line in lines)
    assert all(len(line) <= 1000 for line in lines)
