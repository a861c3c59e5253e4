"""A real HTTPS server on loopback for download tests, with a self-signed certificate.

`https_server` (function scope) serves a fresh folder at https://127.0.0.1:PORT/ and makes
this process trust its certificate (SSL_CERT_FILE, which OpenSSL reads whenever Python
builds a default TLS context). The server binds its own socket (port 0, held open), so no
other process can take the port between choosing and serving. It counts GET requests.
The certificate is made with `cryptography`, which the runtime dependencies install
(mlflow needs it).
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class HttpsServer:
    root: Path  # files under it are served
    url: str  # https://127.0.0.1:PORT
    gets: list[str]  # paths requested so far


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """(certificate, key) PEM files valid for 127.0.0.1 and localhost."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
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
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@pytest.fixture
def https_server(tmp_path, monkeypatch) -> Iterator[HttpsServer]:
    root = tmp_path / "www"
    root.mkdir()
    cert_file, key_file = self_signed_certificate(tmp_path)
    gets: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):
            gets.append(self.path)
            super().do_GET()

        def log_message(self, format, *args):  # keep test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=root))
    server.daemon_threads = True  # a client that dropped mid-handshake must not hold the stop
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
    try:
        yield HttpsServer(root=root, url=f"https://127.0.0.1:{server.server_address[1]}", gets=gets)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
