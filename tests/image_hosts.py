"""ImageHost: a real HTTP(S) server on a loopback address, playing a public image host (well and badly),
or, as a sentinel, a private target that must never be reached. Every request is recorded.

Loopback is private to the gateway, so tests trust exactly the image host's address
(`limits.private_image_networks: [127.0.0.3/32]`) and put the sentinel on another loopback address
(127.0.0.2), which stays private. Paths:
  /ok.png /ok.jpg /ok.gif /ok.webp  a small image of that type          /missing.png   404
  /big.png     PNG bytes over BIG_BYTES, with a content-length            /big-chunked.png  the same, chunked
  /page.html   text/html                                                  /fake.png      image/png type, HTML body
  /gzip.png    a gzip content-encoding                                    /slow.png      answers after SLOW_S
  /loop        a redirect to itself                                       /redirect?to=URL   302 to URL
"""
from __future__ import annotations

import gzip
import ssl
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

PNG = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89"
       b"\x00\x00\x00\rIDATx\x9cc\xf8\xff\xff?\x00\x05\xfe\x02\xfe\xa7\x35\x81\x84\x00\x00\x00\x00IEND\xaeB`\x82")
IMAGES = {"/ok.png": ("image/png", PNG), "/ok.jpg": ("image/jpeg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\0" * 32),
          "/ok.gif": ("image/gif", b"GIF89a\x01\x00\x01\x00" + b"\0" * 16),
          "/ok.webp": ("image/webp", b"RIFF\x1a\x00\x00\x00WEBPVP8 " + b"\0" * 16)}
BIG_BYTES = 256 * 1024
SLOW_S = 5.0


@dataclass(frozen=True)
class Hit:
    path: str
    host_header: str | None
    sni: str | None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.server.record(Hit(self.path, self.headers.get("host"), getattr(self.connection, "sni", None)))
        path, _, query = self.path.partition("?")
        if path in IMAGES:
            return self.reply(200, *IMAGES[path])
        if path == "/big.png":
            return self.reply(200, "image/png", PNG + b"\0" * BIG_BYTES)
        if path == "/big-chunked.png":
            return self.chunked("image/png", [PNG] + [b"\0" * 16384] * (BIG_BYTES // 16384 + 1))
        if path == "/page.html":
            return self.reply(200, "text/html", b"<html>not an image</html>")
        if path == "/fake.png":
            return self.reply(200, "image/png", b"<html>not an image</html>")
        if path == "/gzip.png":
            return self.reply(200, "image/png", gzip.compress(PNG), [("Content-Encoding", "gzip")])
        if path == "/slow.png":
            self.server.stopping.wait(SLOW_S)
            return self.reply(200, *IMAGES["/ok.png"])
        if path == "/loop":
            return self.reply(302, "text/plain", b"", [("Location", "/loop")])
        if path == "/redirect":
            return self.reply(302, "text/plain", b"", [("Location", parse_qs(query)["to"][0])])
        return self.reply(404, "text/plain", b"not found")

    def reply(self, status: int, content_type: str, body: bytes, headers=()) -> None:
        self.send_response(status)
        for name, value in [("Content-Type", content_type), ("Content-Length", str(len(body))), *headers]:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def chunked(self, content_type: str, chunks: list[bytes]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for chunk in chunks:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the gateway stopped reading past its limit: that is the point


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], tls: ssl.SSLContext | None) -> None:
        super().__init__(address, Handler)
        self.hits: list[Hit] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.tls = tls

    def record(self, hit: Hit) -> None:
        with self.lock:
            self.hits.append(hit)

    def handle_error(self, request, client_address) -> None:
        pass  # a client that hung up mid-answer (the gateway past a limit) or failed the TLS handshake

    def get_request(self):
        sock, address = super().get_request()
        if self.tls is None:
            return sock, address
        sock.settimeout(5)
        return self.tls.wrap_socket(sock, server_side=True), address


class ImageHost:
    """`with ImageHost("127.0.0.3") as host:` serves on host.base (http://127.0.0.3:PORT) until the block ends."""

    def __init__(self, ip: str, port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        if tls is not None:
            tls.sni_callback = remember_sni
        self.server = Server((ip, port), tls)
        self.ip, self.port = ip, self.server.server_address[1]
        self.scheme = "https" if tls else "http"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), name=f"image-host-{ip}",
                                       daemon=True)

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.ip}:{self.port}"

    @property
    def hits(self) -> list[Hit]:
        with self.server.lock:
            return list(self.server.hits)

    def __enter__(self) -> ImageHost:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def remember_sni(sock: ssl.SSLSocket, name: str | None, _context: ssl.SSLContext) -> None:
    sock.sni = name  # type: ignore[attr-defined]
