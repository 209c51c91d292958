"""TLS to Redis: a self-signed ``rediss://`` server is refused by both clients unless told otherwise.

Real parts: a redis-server with TLS on a loopback port (certificate made here with ``cryptography``),
the store's redis-py client and the broker's kombu connection as the dispatcher builds them.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from worker import sandbox
from worker.engine import celery_app
from worker.engine.connections import store_client
from worker.settings import Settings

PASSWORD = "tls-test-password-7c1e"  # a test server's, checked never to be printed


@dataclass
class TlsRedis:
    url: str
    ca_file: Path
    proc: subprocess.Popen[bytes]


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, issuer_key: ec.EllipticCurvePrivateKey,
          *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    workdir = tmp_path_factory.mktemp("tls")
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stepworker test CA")])
    ca = _cert("stepworker test CA", ca_key, ca_name, ca_key, ca=True)
    server = _cert("localhost", server_key, ca_name, ca_key, ca=False)
    ca_file = _pem(workdir / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))
    cert_file = _pem(workdir / "server.pem", server.public_bytes(serialization.Encoding.PEM))
    key_file = _pem(workdir / "server.key", server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    port = sandbox.free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "127.0.0.2", "--save", "",
         "--dir", str(workdir), "--tls-cert-file", str(cert_file), "--tls-key-file", str(key_file),
         "--tls-ca-cert-file", str(ca_file), "--tls-auth-clients", "no", "--requirepass", PASSWORD],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sandbox._wait_for(lambda: sandbox._port_open(port), "redis-server with TLS", proc)
    try:
        yield TlsRedis(f"rediss://:{PASSWORD}@127.0.0.1:{port}/0", ca_file, proc)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def settings_for(server: TlsRedis, db: int, **values: object) -> Settings:
    given: dict[str, object] = {"redis_url": server.url.removesuffix("/0") + f"/{db}", **values}
    return Settings(_env_file=None, key_prefix="tls", redis_connect_timeout=2, redis_socket_timeout=2,
                    **given)  # type: ignore[arg-type]


def publish_one(settings: Settings, queue: str) -> None:
    # Publisher apps and kombu's connection pools are cached per broker URL (kombu's key leaves the TLS
    # options out), so each case below uses a database of its own: its own URL, its own pool.
    celery_app._publishers.pop(settings.broker, None)
    celery_app.publish("core.echo", "01TLSTEST", 0, 0, queue=queue, project="default",
                       via=celery_app.publisher(settings))


def test_both_clients_refuse_a_certificate_they_cannot_verify(tls_redis: TlsRedis) -> None:
    settings = settings_for(tls_redis, 1)
    with pytest.raises(redis.ConnectionError) as store_error:
        store_client(settings, "dispatcher").ping()
    assert "certificate verify failed" in str(store_error.value)
    with pytest.raises(Exception) as broker_error:  # noqa: PT011  (kombu wraps it in OperationalError)
        publish_one(settings, "tls-refused")
    assert "certificate verify failed" in str(broker_error.value)
    for error in (store_error.value, broker_error.value):
        assert PASSWORD not in str(error)
    plain = redis.Redis.from_url(settings.redis_url, ssl_ca_certs=str(tls_redis.ca_file))
    assert plain.llen("tls-refused") == 0  # nothing reached the queue


def test_both_clients_connect_with_the_ca_and_check_the_host_name(tls_redis: TlsRedis) -> None:
    settings = settings_for(tls_redis, 2, redis_tls_ca_file=tls_redis.ca_file)
    assert store_client(settings, "dispatcher").ping()
    publish_one(settings, "tls-verified")
    assert store_client(settings, "dispatcher").llen("tls-verified") == 1
    # The certificate names localhost and 127.0.0.1, not this name: refused though the CA is right.
    wrong_host = settings_for(tls_redis, 2, redis_tls_ca_file=tls_redis.ca_file,
                              redis_url=tls_redis.url.replace("127.0.0.1", "127.0.0.2"))
    with pytest.raises(redis.ConnectionError, match=r"match|mismatch|hostname"):
        store_client(wrong_host, "dispatcher").ping()


def test_verification_off_is_explicit_and_warned(tls_redis: TlsRedis, caplog: pytest.LogCaptureFixture) -> None:
    from worker.engine import tls

    tls._warned.clear()
    settings = settings_for(tls_redis, 3, redis_tls_verify=False)
    with caplog.at_level(logging.WARNING, logger="stepworker.tls"):
        assert store_client(settings, "dispatcher").ping()
        publish_one(settings, "tls-unverified")
    assert store_client(settings, "dispatcher").llen("tls-unverified") == 1
    assert "verification is off" in caplog.text
    assert PASSWORD not in caplog.text
