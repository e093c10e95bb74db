"""A tiny static server for the browser viewer page (``web/``).

Why a server at all: getUserMedia, WebCrypto and AudioWorklet only run in a secure
context, and ``http://127.0.0.1`` / ``http://localhost`` count as one, so the page works
locally without certificates. For visitors on other machines put the same files behind
HTTPS (any static host will do); nothing here is needed then.

Binds 127.0.0.1 by default. No rclpy, no state: it only reads files under the root.

    python -m sonic_voice.web --port 8080        # then open http://127.0.0.1:8080/
"""

from __future__ import annotations

import argparse
import functools
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def default_root() -> Path:
    """``web/`` of the source tree, else ``<prefix>/share/sonic_voice/web`` (installed)."""
    candidates = (
        Path(__file__).resolve().parent.parent / "web",
        Path(sys.prefix) / "share" / "sonic_voice" / "web",
    )
    for c in candidates:
        if (c / "index.html").is_file():
            return c
    raise FileNotFoundError(
        "viewer page not found (looked in: " + ", ".join(str(c) for c in candidates) + ")"
    )


class _Handler(SimpleHTTPRequestHandler):
    """Static files with no caching (a reloaded page always gets the current script) and
    no directory listings."""

    extensions_map = {  # noqa: RUF012 - class attribute of the stdlib handler
        **SimpleHTTPRequestHandler.extensions_map,
        ".js": "text/javascript",
        ".wav": "audio/wav",
    }

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        super().end_headers()

    def list_directory(self, path):
        self.send_error(404, "no directory listings")
        return None

    def log_message(self, format: str, *args: object) -> None:
        if not getattr(self.server, "quiet", False):
            super().log_message(format, *args)


def make_server(
    host: str = "127.0.0.1", port: int = 0, root: Path | None = None, quiet: bool = False
) -> ThreadingHTTPServer:
    """A server for ``root`` (the viewer page by default); ``port=0`` picks a free one.
    Call ``serve_forever()`` (or use :func:`serve_in_thread`)."""
    directory = str(root or default_root())
    server = ThreadingHTTPServer((host, port), functools.partial(_Handler, directory=directory))
    server.daemon_threads = True
    server.quiet = quiet  # type: ignore[attr-defined]
    return server


def serve_in_thread(
    host: str = "127.0.0.1", port: int = 0, root: Path | None = None
) -> tuple[ThreadingHTTPServer, str]:
    """Start a quiet server in a daemon thread; returns it (``shutdown()`` to stop) and
    its base URL, e.g. ``http://127.0.0.1:40123/``."""
    server = make_server(host, port, root, quiet=True)
    threading.Thread(target=server.serve_forever, name="web-viewer", daemon=True).start()
    h, p = server.server_address[:2]
    return server, f"http://{h}:{p}/"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 = any)")
    parser.add_argument("--root", type=Path, default=None, help="directory to serve (web/)")
    args = parser.parse_args(argv)
    server = make_server(args.host, args.port, args.root)
    h, p = server.server_address[:2]
    print(f"viewer page: http://{h}:{p}/  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
