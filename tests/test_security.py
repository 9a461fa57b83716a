"""Security: listening policy, bearer tokens with roles, TLS and mutual TLS."""

from __future__ import annotations

import datetime
import ipaddress
import logging
from pathlib import Path

import grpc
import pytest
from helpers import make_settings

from embedwarden.client import (
    Client,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from embedwarden.server.rpc._security import (
    SecurityConfigError,
    check_policy,
    load_tokens,
    new_token,
)
from embedwarden.server.testing import ServerThread

MODEL = "efficientnet_lite0"


def test_non_loopback_needs_tls_and_tokens_or_an_explicit_insecure(tmp_path, caplog):
    with pytest.raises(SecurityConfigError, match="--tls-cert/--tls-key and --tokens-file"):
        check_policy(make_settings(tmp_path, host="0.0.0.0"))
    tokens = tmp_path / "tokens.toml"
    new_token(tokens, "ops", "admin")
    with pytest.raises(SecurityConfigError, match="--tls-cert"):
        check_policy(make_settings(tmp_path, host="0.0.0.0", tokens_file=tokens))
    with pytest.raises(SecurityConfigError, match="go together"):
        check_policy(make_settings(tmp_path, tls_cert=tmp_path / "c.pem"))
    with caplog.at_level(logging.WARNING):
        check_policy(make_settings(tmp_path, host="0.0.0.0", insecure=True))
    assert "--insecure" in caplog.text and "no TLS" in caplog.text
    for host in ("127.0.0.1", "::1", "localhost"):
        check_policy(make_settings(tmp_path, host=host))  # loopback: plaintext is fine


def test_tokens_are_stored_hashed(tmp_path):
    path = tmp_path / "tokens.toml"
    token = new_token(path, "trainer", "reader")
    text = path.read_text()
    assert token not in text and "trainer" in text
    assert path.stat().st_mode & 0o077 == 0  # not readable by others
    entries = load_tokens(path)
    assert [(e.name, e.role.name) for e in entries.values()] == [("trainer", "READER")]


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("auth")
    tokens_file = folder / "tokens.toml"
    tokens = {
        role: new_token(tokens_file, f"{role}-1", role) for role in ("reader", "writer", "admin")
    }
    with ServerThread(make_settings(folder / "data", tokens_file=tokens_file)) as thread:
        yield thread, tokens


def test_missing_or_unknown_tokens_are_unauthenticated(token_server, photos):
    thread, _ = token_server
    with (
        Client(thread.address, token="") as anonymous,
        pytest.raises(Unauthenticated, match="Bearer"),
    ):
        anonymous.extract([photos["coffee"]], MODEL)
    with (
        Client(thread.address, token="not-a-token") as stranger,
        pytest.raises(Unauthenticated, match="unknown token"),
    ):
        stranger.list_models()


def test_roles_gate_rpcs(token_server, photos):
    thread, tokens = token_server
    with Client(thread.address, token=tokens["reader"]) as reader:
        assert reader.extract([photos["coffee"]], MODEL).array.shape == (1, 1280)
        with pytest.raises(PermissionDenied, match="needs admin"):
            reader.load_model(MODEL)
    with (
        Client(thread.address, token=tokens["writer"]) as writer,
        pytest.raises(PermissionDenied, match="role writer"),
    ):
        writer.unload_model(MODEL)
    with Client(thread.address, token=tokens["admin"]) as admin:
        assert admin.load_model(MODEL).model.identity.name == MODEL  # already loaded: a no-op


def test_health_stays_open(token_server):
    thread, _ = token_server
    with Client(thread.address, token="") as anonymous:
        assert anonymous.health() == "SERVING"


# --- TLS -------------------------------------------------------------------------------------


def _certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(subject: str, issuer_key, issuer_name, key, *, ca=False, san=None, usage=None):
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(path: Path, obj) -> Path:
        if isinstance(obj, x509.Certificate):
            path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
        else:
            path.write_bytes(
                obj.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("embedwarden-test-ca", ca_key, name("embedwarden-test-ca"), ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = issue(
        "localhost",
        ca_key,
        ca.subject,
        server_key,
        san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = issue("trainer", ca_key, ca.subject, client_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    return {
        "ca": write(folder / "ca.pem", ca),
        "server_cert": write(folder / "server.pem", server),
        "server_key": write(folder / "server.key", server_key),
        "client_cert": write(folder / "client.pem", client),
        "client_key": write(folder / "client.key", client_key),
    }


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    certs = _certificates(folder)
    tokens_file = folder / "tokens.toml"
    token = new_token(tokens_file, "trainer", "reader")
    settings = make_settings(
        folder / "data",
        host="0.0.0.0",
        tls_cert=certs["server_cert"],
        tls_key=certs["server_key"],
        tls_client_ca=certs["ca"],
        tokens_file=tokens_file,
    )
    with ServerThread(settings) as thread:
        yield thread, certs, token


def test_mutual_tls_with_a_token_serves(mtls_server, photos):
    thread, certs, token = mtls_server
    with Client(
        thread.address,
        token=token,
        root_certificates=certs["ca"].read_bytes(),
        certificate_chain=certs["client_cert"].read_bytes(),
        private_key=certs["client_key"].read_bytes(),
        timeout=30,
    ) as client:
        assert client.extract([photos["chelsea"]], MODEL).array.shape == (1, 1280)


def test_tls_refuses_plaintext_and_clients_without_a_certificate(mtls_server):
    thread, certs, token = mtls_server
    with (
        Client(thread.address, token=token, timeout=5, retries=1) as plaintext,
        pytest.raises(Unavailable),
    ):
        plaintext.list_models()
    with (
        Client(
            thread.address,
            token=token,
            root_certificates=certs["ca"].read_bytes(),
            timeout=5,
            retries=1,
        ) as no_client_cert,
        pytest.raises(Unavailable),
    ):
        no_client_cert.list_models()
    with grpc.secure_channel(
        thread.address,
        grpc.ssl_channel_credentials(
            certs["ca"].read_bytes(),
            certs["client_key"].read_bytes(),
            certs["client_cert"].read_bytes(),
        ),
    ) as channel:
        from embedwarden.v1 import embedding_pb2, embedding_pb2_grpc

        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:  # TLS is fine, the token is missing
            stub.ListModels(embedding_pb2.ListModelsRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
