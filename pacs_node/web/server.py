"""uvicorn in a thread of the node: started and stopped with it, bound before it answers.

The listening socket is bound by :meth:`HttpServer.start` itself (so that a port in
use is an error of ``lungsys serve`` naming the key, and port 0 works for tests),
then handed to uvicorn, which runs its event loop in a daemon thread with the
guarded protocol of :mod:`pacs_node.web.protocol`. uvicorn's own logging
configuration, signal handlers, lifespan and access log are off: the node logs
what matters itself (no patient data in a URL is ever logged).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading

import uvicorn

from pacs_node.peers import PeerGate
from pacs_node.web.protocol import guarded

log = logging.getLogger("pacs_node.web")

#: Connections waiting to be accepted.
BACKLOG = 128
#: Request line and headers: at most this many bytes (h11's limit of an incomplete event).
MAX_HEAD_BYTES = 64 * 1024
#: Seconds a server waits for its requests in flight when stopped.
STOP_SECONDS = 5.0


class HttpServer:
    """One ASGI app on one address, behind ``gate``."""

    def __init__(self, app, gate: PeerGate, *, header_seconds: float = 30.0,
                 idle_seconds: float = 30.0, tls: ssl.SSLContext | None = None) -> None:
        self.app = app
        self.gate = gate
        self.header_seconds = header_seconds
        self.idle_seconds = idle_seconds
        self.tls = tls
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    def start(self, host: str, port: int) -> None:
        """Bind (OSError when the address is taken) and serve in a thread."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(BACKLOG)
        except OSError:
            sock.close()
            raise
        self._socket = sock
        config = uvicorn.Config(
            self.app, http=guarded(self.gate, self.header_seconds, self.idle_seconds),
            lifespan="off",
            log_config=None, access_log=False, server_header=False, date_header=True,
            # the peer is the socket's: a client's X-Forwarded-For must not choose the
            # address the sign-in limit, the logs and the peer gate see
            proxy_headers=False,
            timeout_keep_alive=int(max(1, self.idle_seconds)), backlog=BACKLOG,
            h11_max_incomplete_event_size=MAX_HEAD_BYTES,
            timeout_graceful_shutdown=int(STOP_SECONDS))
        self._server = uvicorn.Server(config)
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            async def serve() -> None:
                try:
                    await self._server.startup(sockets=[sock])
                except BaseException as exc:   # noqa: BLE001 - handed to start()
                    failure.append(exc)
                    started.set()
                    return
                started.set()
                await self._server.main_loop()
                await self._server.shutdown(sockets=[sock])
            self._server.config.load()
            self._server.config.ssl = self.tls     # load() would reset it
            self._server.lifespan = self._server.config.lifespan_class(self._server.config)
            asyncio.run(serve())

        self._thread = threading.Thread(target=run, name="lungsys-http", daemon=True)
        self._thread.start()
        started.wait(30)
        if failure:
            raise OSError(f"the HTTP service did not start: {failure[0]}")

    @property
    def port(self) -> int:
        return self._socket.getsockname()[1] if self._socket is not None else 0

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(STOP_SECONDS + 5)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None
