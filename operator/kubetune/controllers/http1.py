"""One HTTP/1.1 connection, kept between requests: what the operator's API requests and store reads need.

``http.client`` parses every answer's headers with the ``email`` package. In the
steady state of a thousand running FineTunes that was 28% of the operator's CPU
(a profile of ``bench/operator_scale.py --steady 1000 --profile``: S3 servers
send a dozen headers), more than signing, sending and reading the answer
together; the API server's answers went the same way. A request here is written
in one ``sendall``; an answer is a status line, headers split at the first
colon (names lower-cased), and a body of ``Content-Length`` bytes, of chunks,
or of everything until the server closes the connection.
"""

from __future__ import annotations

import select
import socket
import ssl
from dataclasses import dataclass

MAX_LINE = 65536


@dataclass(frozen=True)
class Answer:
    status: int
    reason: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    keep: bool  # the connection may carry another request


class Http1Connection:
    """A connection to one server; :meth:`request` sends one request and reads its whole answer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = sock.makefile("rb")

    @classmethod
    def open(
        cls,
        host: str,
        port: int,
        *,
        connect_timeout: float,
        read_timeout: float,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> Http1Connection:
        """Connect now (raises OSError when the server cannot be reached in ``connect_timeout``)."""
        sock = socket.create_connection((host, port), timeout=connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=server_hostname or host)
            sock.settimeout(read_timeout)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def dropped(self) -> bool:
        """Whether the server closed this idle connection (its socket reads as ready: EOF, or an unasked-for byte)."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def request(
        self,
        method: str,
        target: str,
        host: str,
        headers: dict[str, str],
        body: bytes | None = None,
        max_bytes: int | None = None,
    ) -> Answer:
        """Send one request and read its answer; a body over ``max_bytes`` is cut at ``max_bytes`` + 1."""
        lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
        lines += [f"{name}: {value}" for name, value in headers.items() if name.lower() != "host"]
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body or b'')}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))
        line = self.reader.readline(MAX_LINE)
        if not line:
            raise ConnectionResetError("the server closed the connection before answering")
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            raise ConnectionError(f"not an HTTP answer: {line[:80]!r}")
        status, reason = int(parts[1]), (parts[2].strip().decode("latin-1") if len(parts) > 2 else "")
        answer: dict[str, str] = {}
        while (line := self.reader.readline(MAX_LINE)) not in (b"\r\n", b"\n", b""):
            name, _, value = line.partition(b":")
            answer[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        keep = parts[0] == b"HTTP/1.1" and answer.get("connection", "").lower() != "close"
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return Answer(status, reason, answer, b"", keep)
        data, whole = self._body(answer, max_bytes)
        return Answer(status, reason, answer, data, keep and whole)

    def _body(self, answer: dict[str, str], max_bytes: int | None) -> tuple[bytes, bool]:
        """(the body, up to ``max_bytes`` + 1 when given; whether all of it was read)."""
        limit = max_bytes + 1 if max_bytes is not None else None
        if "chunked" in answer.get("transfer-encoding", "").lower():
            return self._chunks(limit)
        if "content-length" in answer:
            length = int(answer["content-length"])
            wanted = length if limit is None else min(length, limit)
            data = self.reader.read(wanted)
            if len(data) < wanted:
                raise ConnectionResetError("the server closed the connection in the middle of the body")
            return data, wanted == length
        return self.reader.read(limit if limit is not None else -1), False  # until the server closes it

    def _chunks(self, limit: int | None) -> tuple[bytes, bool]:
        chunks, size = [], 0
        while (length := int(self.reader.readline(MAX_LINE).split(b";")[0].strip() or b"0", 16)) > 0:
            if limit is not None and size + length >= limit:
                chunks.append(self.reader.read(limit - size))
                return b"".join(chunks), False
            chunk = self.reader.read(length)
            if len(chunk) < length:
                raise ConnectionResetError("the server closed the connection in the middle of the body")
            chunks.append(chunk)
            self.reader.readline(MAX_LINE)  # the chunk's CRLF
            size += length
        while self.reader.readline(MAX_LINE) not in (b"\r\n", b"\n", b""):
            pass  # trailers
        return b"".join(chunks), True
