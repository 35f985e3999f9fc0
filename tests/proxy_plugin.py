"""A proxy.py plugin for the tests: appends each request it proxies to the file named by
``$GATEWAY_TEST_PROXY_LOG`` at once (proxy.py's own access log waits for the connection to end).
"""

from __future__ import annotations

import os

from proxy.http.parser import HttpParser
from proxy.http.proxy import HttpProxyBasePlugin


class RequestLogPlugin(HttpProxyBasePlugin):  # type: ignore[misc]
    """Records ``METHOD host:port path`` per proxied request; changes nothing."""

    def before_upstream_connection(self, request: HttpParser) -> HttpParser:
        return request

    def handle_client_request(self, request: HttpParser) -> HttpParser:
        host = (request.host or b"?").decode("ascii", "replace")
        line = f"{(request.method or b'?').decode()} {host}:{request.port} {request.path!r}\n"
        with open(os.environ["GATEWAY_TEST_PROXY_LOG"], "a", encoding="utf-8") as log:
            log.write(line)
        return request

    def handle_upstream_chunk(self, chunk: memoryview) -> memoryview:
        return chunk

    def on_upstream_connection_close(self) -> None:
        pass
