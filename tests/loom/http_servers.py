"""Real local HTTP(S) servers for the fetch tests: they count the requests (path, Host header)
and the SNI names they see, and serve fixed paths (/, /redirect, /loop, /status, /big,
/big-unsized, /slow, /trickle) so that a test can tell whether a refused URL ever reached them."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from fixtures_worker import missing

BODY = b"hello from the test server"
BIG = 10_000


@dataclass
class Server:
    host: str
    port: int
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Host header)
    release: threading.Event = field(default_factory=threading.Event)
    sni: list[str | None] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.requests)

    def url(self, path: str = "/", scheme: str = "http") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}{path}"


def _handler(state: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # close-delimited bodies when no Content-Length

        def log_message(self, *args: object) -> None:  # quiet
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  length: bool = True) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if length:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            state.requests.append((self.path, self.headers.get("Host")))
            parts = urlsplit(self.path)
            q = {k: v[0] for k, v in parse_qs(parts.query).items()}
            try:
                if parts.path == "/":
                    self._send(200, BODY)
                elif parts.path == "/redirect":
                    self._send(int(q.get("code", "302")), headers={"Location": q["to"]})
                elif parts.path == "/loop":
                    self._send(302, headers={"Location": "/loop"})
                elif parts.path == "/status":
                    self._send(int(q["code"]), b"nope")
                elif parts.path == "/big":
                    self._send(200, b"x" * BIG)
                elif parts.path == "/big-unsized":
                    self._send(200, b"x" * BIG, length=False)
                elif parts.path == "/slow":
                    state.release.wait(10)
                    self._send(200, BODY)
                elif parts.path == "/trickle":
                    self.send_response(200)
                    self.end_headers()
                    for _ in range(200):
                        if state.release.is_set():
                            break
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.05)
                else:
                    self._send(404, b"no such path")
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass

    return Handler


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: object, client_address: object) -> None:
        pass


def start_server(host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> Iterator[Server]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class S(_Quiet):
        address_family = family

    state = Server(host=host, port=0)
    httpd = S((host, 0), _handler(state))
    state.port = httpd.server_address[1]
    if tls is not None:
        tls.sni_callback = lambda sock, name, ctx: state.sni.append(name)
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def tls_pair(tmp_path: Path, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    try:
        from cryptography import x509
    except ImportError:
        missing("the cryptography package")  # skips locally, fails under CI=true
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client_ctx = ssl.create_default_context(cadata=cert_pem.decode())
    return server_ctx, client_ctx
