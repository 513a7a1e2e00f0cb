"""An S3-compatible server on loopback (moto's server mode) for the test cluster.

The trainer and the operator store adapters and eval reports through boto3 with
an ``endpoint_url``; against this server boto3 does real HTTP, signing and XML
parsing, so what passes here is what talks to MinIO or S3. moto runs as its own
process (not in-process mocking) because pods, which are separate processes,
must reach it too.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
from botocore.config import Config

from tests.cluster.procs import Service, free_port, stop_all, wait_until


@dataclass
class S3Server:
    """A running moto server and the static credentials it accepts (it accepts any)."""

    endpoint_url: str
    service: Service | None  # None: attached to a server another process runs
    access_key: str = "testing"
    secret_key: str = "testing"
    region: str = "us-east-1"

    @classmethod
    def start(cls, log_dir: Path, host: str = "127.0.0.1") -> S3Server:
        """Start the server on ``host``; ``wait_ready`` waits for it (it takes a second or two to import).

        With a real node, ``host`` is the host's end of the node's link, which pods reach too.
        """
        port = free_port()
        service = Service.spawn("s3", [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)], log_dir)
        return cls(f"http://{host}:{port}", service)

    @classmethod
    def attach(cls, endpoint_url: str) -> S3Server:
        """The server another process started (it stops it)."""
        return cls(endpoint_url, None)

    @property
    def host(self) -> str:
        """The address it listens on (a fault proxy in front of it listens there too, so pods reach both)."""
        return urlparse(self.endpoint_url).hostname or "127.0.0.1"

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint_url + "/moto-api/", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 60.0) -> None:
        services = [] if self.service is None else [self.service]
        wait_until(self._answers, timeout=timeout, what="the S3 server", services=services)

    def client(self) -> Any:
        """A boto3 S3 client for this server (path-style addressing: no DNS for bucket names)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}),
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def env(self) -> dict[str, str]:
        """The variables that point an AWS SDK (in a pod, or a person's shell) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def stop(self) -> None:
        if self.service is not None:
            stop_all([self.service])
