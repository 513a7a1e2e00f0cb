"""A model hub on loopback that speaks the part of the Hugging Face Hub protocol ``snapshot_download`` uses.

No hub is reachable from the machines kubetune is tested on, yet ``hf://``
base models are a real loading path. This server serves repositories from
local folders (``<root>/<org>/<name>/``) over HTTP: the revision and tree
APIs that list files, and ``resolve`` URLs that return them. Point
``HF_ENDPOINT`` at it and ``huggingface_hub`` does the rest for real.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path
from typing import Any

COMMIT = "0" * 40


class LocalHub:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(head=True)

            def do_GET(self) -> None:
                self._serve(head=False)

            def _send(self, code: int, body: bytes, headers: dict[str, str], head: bool) -> None:
                self.send_response(code)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _serve(self, head: bool) -> None:
                hub.requests.append(f"{self.command} {self.path}")
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 5:
                    repo = hub.root / parts[2] / parts[3]
                    if not repo.is_dir():
                        self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, head)
                        return
                    files = sorted(p for p in repo.rglob("*") if p.is_file())
                    if parts[4] == "revision":
                        siblings = [{"rfilename": p.relative_to(repo).as_posix()} for p in files]
                        body: Any = {"id": f"{parts[2]}/{parts[3]}", "sha": COMMIT, "siblings": siblings}
                    else:  # tree
                        body = [
                            {
                                "type": "file",
                                "path": p.relative_to(repo).as_posix(),
                                "size": p.stat().st_size,
                                "oid": hashlib.sha1(p.read_bytes()).hexdigest(),
                            }
                            for p in files
                        ]
                    self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)
                    return
                if len(parts) >= 5 and parts[2] == "resolve":
                    path = hub.root / parts[0] / parts[1] / "/".join(parts[4:])
                    if not path.is_file():
                        self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
                        return
                    data = path.read_bytes()
                    etag = '"' + hashlib.sha256(data).hexdigest() + '"'
                    self._send(200, data, {"X-Repo-Commit": COMMIT, "ETag": etag}, head)
                    return
                self._send(404, b"", {}, head)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
