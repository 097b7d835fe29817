"""The client against a daemon with TLS and bearer tokens: the CA and the daemon's
certificate are made here (with the `cryptography` package that grpcio's tests pull in)."""

from __future__ import annotations

import datetime
import ipaddress

import grpc
import pytest

import likeness
from conftest import Daemon, clustered, daemon_binary

from cryptography import x509  # noqa: E402  (requirements-test.txt pins it)
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

READ_TOKEN = "py-read-3c9e71"
WRITE_TOKEN = "py-write-b04d52"


def _name(cn: str) -> "x509.Name":
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_pki(tmp_path):
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key) paths."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("python test CA"))
        .issuer_name(_name("python test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("likeness"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    """A daemon with TLS and tokens: (address, CA path)."""
    tmp = tmp_path_factory.mktemp("tls")
    ca, cert, key = make_pki(tmp)
    tokens = tmp / "tokens"
    tokens.write_text(f"read {READ_TOKEN}\nwrite {WRITE_TOKEN}\n")
    d = Daemon(
        daemon_binary(),
        tmp / "data",
        # Metrics off: the session's other daemon holds the default port.
        ["--tls-cert", str(cert), "--tls-key", str(key), "--tokens-file", str(tokens)]
        + ["--metrics-listen", "off"],
    )
    yield d.address, ca
    d.stop()
    assert d.proc.returncode == 0, "\n".join(d.log[-30:])


def test_tls_and_tokens(secure):
    address, ca = secure
    ids, vectors, labels = clustered(4, 10, 8, seed=3)
    with likeness.Client(address, tls_ca=ca, token=WRITE_TOKEN, timeout=30) as w:
        w.wait_ready(60)
        w.create_collection("secure", 8, "cosine")
        # A client stream (UpsertStream) carries the token as unary calls do.
        w.upsert("secure", ids, vectors, labels=labels, batch_size=16, atomic=True)
        assert w.get_collection("secure").count == len(ids)

    with likeness.Client(address, tls_ca=ca.read_bytes(), token=READ_TOKEN, timeout=30) as r:
        hits = r.search("secure", vectors[0], k=3)
        assert hits.ids[0] == ids[0]
        # A server stream.
        batches = list(r.mine_triplets("secure", "hard", batch_size=8, seed=1))
        assert sum(len(b.anchor_ids) for b in batches) > 0
        with pytest.raises(likeness.LikenessError) as e:
            r.delete("secure", ids[:1])
        assert e.value.code == grpc.StatusCode.PERMISSION_DENIED

    with likeness.Client(address, tls_ca=ca, timeout=30) as anonymous:
        # Health needs no token: readiness checks still work.
        assert anonymous.serving()
        with pytest.raises(likeness.LikenessError) as e:
            anonymous.list_collections()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED

    with likeness.Client(address, token=WRITE_TOKEN, timeout=5) as plaintext:
        with pytest.raises(likeness.LikenessError) as e:
            plaintext.list_collections()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_aio_tls_and_tokens(secure):
    import asyncio

    import likeness.aio

    address, ca = secure
    ids, vectors, labels = clustered(4, 10, 8, seed=5)

    async def main():
        async with likeness.aio.Client(address, tls_ca=ca, token=WRITE_TOKEN, timeout=30) as w:
            await w.wait_ready(60)
            await w.create_collection("secure-aio", 8, "cosine")
            # Unary calls, a client stream, a server stream and a Session carry the token.
            await w.upsert("secure-aio", ids, vectors, labels=labels, batch_size=16, atomic=True)
            assert (await w.get_collection("secure-aio")).count == len(ids)
            anchors = [a async for b in w.mine_triplets("secure-aio", "hard") for a in b.anchor_ids]
            assert anchors
            async with w.session("secure-aio", "hard") as s:
                assert len(await s.step(ids[:4])) > 0
        async with likeness.aio.Client(address, tls_ca=ca, token=READ_TOKEN, timeout=30) as r:
            assert (await r.search("secure-aio", vectors[0], k=1)).ids == [ids[0]]
            with pytest.raises(likeness.LikenessError) as e:
                await r.delete("secure-aio", ids[:1])
            assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
        async with likeness.aio.Client(address, tls_ca=ca, timeout=30) as anonymous:
            assert await anonymous.serving()
            with pytest.raises(likeness.LikenessError) as e:
                await anonymous.list_collections()
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED

    asyncio.run(main())
