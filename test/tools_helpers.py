"""Helpers for the tools-beyond-ROS tests: a streamable-HTTP MCP server of our own (official
SDK, uvicorn on 127.0.0.1) and the paths of the shipped FAQ and the stdio time server."""

import asyncio
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from mcp.server.fastmcp import Context, FastMCP

ROOT = Path(__file__).resolve().parent.parent
FAQ = ROOT / "config" / "knowledge"
HERE = Path(__file__).resolve()
TIME_SERVER = f"{{command: {sys.executable}, args: [-m, mcp_server_time, --local-timezone, UTC]"


class SlowMcpServer:
    """FastMCP over streamable HTTP with a slow tool that reports progress and records
    whether the client cancelled it (``notifications/cancelled`` cancels its task)."""

    def __init__(self) -> None:

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.started = threading.Event()
        self.cancelled = threading.Event()
        self.calls = 0
        self.headers: list[str | None] = []  # the X-Robot header of each call
        app = FastMCP("slow", host="127.0.0.1", port=self.port, log_level="WARNING")

        @app.tool(description="Wait some seconds, then say done.")
        async def wait_for(seconds: float, ctx: Context) -> str:
            self.calls += 1
            request = ctx.request_context.request
            self.headers.append(request.headers.get("x-robot") if request else None)
            self.started.set()
            steps = max(1, int(seconds * 20))
            try:
                for i in range(steps):
                    await ctx.report_progress(i + 1, steps, f"step {i + 1} of {steps}")
                    await asyncio.sleep(seconds / steps)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            return f"waited {seconds:g} s"

        import uvicorn

        self.server = uvicorn.Server(
            uvicorn.Config(
                app.streamable_http_app(),
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
                lifespan="on",
            )
        )
        self.thread = threading.Thread(target=self.server.run, name="mcp-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def __enter__(self) -> "SlowMcpServer":
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started, "the MCP HTTP server did not start"
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def slow_stdio_server(marker: str) -> str:
    """YAML flow mapping of a stdio MCP server (this file run as a script) whose
    ``wait_for`` tool touches ``marker + '.started'`` / ``'.cancelled'``."""
    return f"{{command: {sys.executable}, args: [{HERE}, {marker}], env: {{PYTHONPATH: {ROOT}}}"


def _main(marker: str) -> None:
    app = FastMCP("slow-stdio", log_level="WARNING")

    @app.tool(description="Wait some seconds, then say done.")
    async def wait_for(seconds: float, ctx: Context) -> str:
        Path(marker + ".started").touch()  # noqa: ASYNC240 - a test marker, once
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            Path(marker + ".cancelled").touch()  # noqa: ASYNC240
            raise
        return f"waited {seconds:g} s"

    app.run(transport="stdio")


if __name__ == "__main__":
    _main(sys.argv[1])
