"""The whole local center on one event loop: gRPC (Transfer, FileExt), service
discovery and the download server. Used by the CLI directly and by `testing.CenterThread`
on a background thread."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from elkeid_center.certs import CertFiles
from elkeid_center.httpd import FileServer, HttpServer, ServiceDiscovery
from elkeid_center.server import AgentCenterServer, ServerTls
from elkeid_center.store import Store


class LocalCenter:
    """Owns the servers; `store` holds what they received."""

    def __init__(
        self,
        certs: CertFiles,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        sd_port: int = 0,
        file_port: int = 0,
        files_dir: str | os.PathLike[str] | None = None,
        server_tls: ServerTls | None = None,
        files_ssl: ssl.SSLContext | None = None,
    ) -> None:
        self.certs = certs
        self.host = host
        self.store = Store()
        self.grpc = AgentCenterServer(
            self.store, server_tls or ServerTls.from_certs(certs), host, port
        )
        self.sd = ServiceDiscovery()
        self.files = FileServer(Path(files_dir) if files_dir is not None else None)
        self.sd_http = HttpServer(self.sd.handle, host, sd_port)
        self.file_http = HttpServer(self.files.handle, host, file_port, files_ssl)

    async def start(self) -> None:
        """Start everything; service discovery initially points at this center."""
        await self.grpc.start()
        await self.sd_http.start()
        await self.file_http.start()
        self.sd.set_backends([(self.host, self.grpc.port)])

    async def close(self) -> None:
        await self.grpc.stop()
        await self.sd_http.close()
        await self.file_http.close()

    def file_url(self, name: str) -> str:
        scheme = "https" if self.file_http.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.file_http.port}/{name.lstrip('/')}"
