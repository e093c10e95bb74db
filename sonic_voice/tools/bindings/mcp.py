"""``mcp:`` the tools of a Model Context Protocol server, offered to Nova Sonic as they are.

YAML (one entry per server; it offers one tool per server tool, named ``prefix + name``)::

    - name: time
      mcp:
        command: mcp-server-time          # stdio: command, args, env (added to a clean env)
        args: [--local-timezone, Europe/Madrid]
        # url: http://127.0.0.1:8000/mcp  # or streamable HTTP: url, headers
        allow: [get_current_time]         # server tools offered (default: all)
        prefix: time_                     # default: "<name>_"
        start_timeout_s: 20
        progress: {every_s: 1, speak_every_s: 10, speak: "{message}"}

With the official ``mcp`` SDK. Each server lives on a loop thread of its own (its
ClientSession must stay in the task that opened it, it is started in the node's configure
before any session loop exists, and it must outlive a session loop); calls cross to it with
``run_coroutine_threadsafe``. That costs 0.7 ms CPU per call (p50) and, measured on this
2-core machine under a load average of 12, 3.0 ms p50 / 28 ms p99 of wall time over a bare
SDK call (``bench/tools_beyond.py``: the tail is the two extra thread wake-ups waiting for
a core; a shared loop for all servers with the lead's rclpy<->asyncio bridge would remove
one of them). A supervisor pings the server every second; a server that died
is restarted with exponential backoff (0.5 s doubling to 10 s) and meanwhile its calls are
answered at once with an error the model can relay. A call cancelled (barge-in, stop,
timeout) is cancelled at the server too (``notifications/cancelled``). Progress
notifications are reported like action feedback, optionally as a spoken template.

Start-up errors (one line naming file, tool and field): a command not found, a server
that does not start or answer, an allowlisted tool the server does not have, a tool whose
name or input schema Nova Sonic cannot take (see :func:`schema_problem`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import json
import logging
import re
import shutil
import string
import threading
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from sonic_voice.sonic.tools_seam import ToolResult
from sonic_voice.tools.bindings.base import (
    Binding,
    Call,
    Interrupted,
    LoadContext,
    ProgressSpec,
    ToolConfigError,
    check_keys,
    number,
)
from sonic_voice.tools.bindings.base import error as _err

log = logging.getLogger(__name__)

KEYS = frozenset({"command", "args", "env", "cwd", "url", "headers", "allow", "prefix",
                  "start_timeout_s", "progress", "timeout_s"})  # fmt: skip
TOOL_NAME_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9_-]{0,63}$")
MAX_SCHEMA_CHARS = 16_000
PING_S = 1.0
BACKOFF_S = (0.5, 10.0)


def schema_problem(schema: Any) -> str:
    """Why Nova Sonic cannot take ``schema`` as a tool's input ('' when it can).

    Its ``inputSchema.json`` is a JSON Schema string of a top-level object; we also refuse
    remote ``$ref`` (the model never fetches them) and schemas over 16 k characters (every
    tool's schema is sent on each new stream and costs prompt tokens).
    """
    if not isinstance(schema, dict):
        return "the input schema is not an object"
    if schema.get("type", "object") != "object":
        return f"the input schema's top-level type is {schema.get('type')!r}, not 'object'"
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        return f"the input schema is not valid JSON Schema ({e.message})"
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_CHARS:
        return f"the input schema is {len(text)} characters (at most {MAX_SCHEMA_CHARS})"
    for m in re.finditer(r'"\$ref":\s*"([^"]*)"', text):
        if not m.group(1).startswith("#"):
            return f"the input schema refers to a remote schema ({m.group(1)})"
    return ""


class McpServer:
    """One MCP server: its loop thread, supervisor, session and tool list."""

    def __init__(self, label: str, cfg: dict[str, Any]) -> None:
        self.label = label
        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"mcp-{label}",
                                       daemon=True)  # fmt: skip
        self.session: Any = None
        self.tools: list[Any] = []
        self.up = False
        self.restarts = 0
        self.last_error = ""
        self.ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._broken: asyncio.Event | None = None
        self._task: asyncio.Future | None = None

    def start(self, timeout_s: float) -> None:
        """Start the server and list its tools (blocking, at most ``timeout_s``)."""
        self.thread.start()
        self._task = asyncio.run_coroutine_threadsafe(self._supervise(), self.loop)  # type: ignore[assignment]
        if not self.ready.wait(timeout_s):
            self.close()
            raise TimeoutError(f"no answer within {timeout_s:g} s")
        if not self.up:
            self.close()
            raise RuntimeError(self.last_error or "the server did not start")

    @contextlib.asynccontextmanager
    async def _connect(self) -> Any:
        from mcp import ClientSession

        if "url" in self.cfg:
            import httpx
            from mcp.client.streamable_http import streamable_http_client

            headers = {str(k): str(v) for k, v in (self.cfg.get("headers") or {}).items()}
            # The SDK's default timeouts: 30 s to connect/write, 300 s to read a stream.
            timeout = httpx.Timeout(30.0, read=300.0)
            async with (
                httpx.AsyncClient(headers=headers, timeout=timeout) as client,
                streamable_http_client(self.cfg["url"], http_client=client) as (read, write, _),
                ClientSession(read, write) as s,
            ):
                yield s
        else:
            from mcp import StdioServerParameters
            from mcp.client.stdio import stdio_client

            params = StdioServerParameters(
                command=self.cfg["command"],
                args=[str(a) for a in self.cfg.get("args", [])],
                env={str(k): str(v) for k, v in self.cfg.get("env", {}).items()} or None,
                cwd=self.cfg.get("cwd"),
            )
            async with stdio_client(params) as (read, write), ClientSession(read, write) as s:
                yield s

    async def _supervise(self) -> None:
        self._stop = asyncio.Event()
        self._broken = asyncio.Event()
        backoff = BACKOFF_S[0]
        while not self._stop.is_set():
            try:
                async with self._connect() as session:
                    await session.initialize()
                    listed = await session.list_tools()
                    self.tools = list(listed.tools)
                    self.session = session
                    self.up = True
                    self._broken.clear()
                    self.ready.set()
                    backoff = BACKOFF_S[0]
                    await self._watch(session)
            except Exception as e:  # noqa: BLE001 - any failure is a crash to recover from
                self.last_error = _describe(e)
                log.warning("MCP server %s: %s", self.label, self.last_error)
            finally:
                self.up = False
                self.session = None
            if self._stop.is_set() or not self.ready.is_set():
                self.ready.set()  # a start-up failure: start() reports it
                return
            self.restarts += 1
            log.warning("MCP server %s stopped; restarting in %.1f s", self.label, backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), backoff)
            backoff = min(backoff * 2, BACKOFF_S[1])

    async def _watch(self, session: Any) -> None:
        """Return when asked to stop, or when the server stops answering."""
        assert self._stop is not None and self._broken is not None
        while True:
            stop = asyncio.ensure_future(self._stop.wait())
            broken = asyncio.ensure_future(self._broken.wait())
            done, pending = await asyncio.wait({stop, broken}, timeout=PING_S,
                                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            for p in pending:
                p.cancel()
            if stop in done:
                return
            if broken in done:
                raise ConnectionError("a call found the connection closed")
            await asyncio.wait_for(session.send_ping(), 2 * PING_S)

    async def call(self, name: str, args: dict[str, Any], on_progress: Any) -> Any:
        """On the server's loop: one tools/call; a cancelled call is cancelled at the server."""
        from mcp import types

        session = self.session
        if session is None:
            raise ConnectionError("not connected")
        # The id the SDK gives this request (assigned in order, no await before it is sent):
        # needed to name the request in notifications/cancelled, which the SDK does not send.
        rid = session._request_id
        try:
            return await session.call_tool(name, args, progress_callback=on_progress)
        except asyncio.CancelledError:
            note = types.ClientNotification(
                types.CancelledNotification(
                    params=types.CancelledNotificationParams(requestId=rid, reason="cancelled")
                )
            )
            self.loop.create_task(session.send_notification(note))
            raise
        except Exception as e:
            if _is_connection_error(e) and self._broken is not None:
                self._broken.set()
            raise

    def close(self) -> None:
        if self.thread.is_alive():
            if self._stop is not None:
                self.loop.call_soon_threadsafe(self._stop.set)
            if self._task is not None:
                with contextlib.suppress(Exception):
                    self._task.result(5)  # type: ignore[union-attr]
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


def _describe(e: BaseException) -> str:
    if isinstance(e, BaseExceptionGroup):
        return "; ".join(_describe(x) for x in e.exceptions)
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _is_connection_error(e: BaseException) -> bool:
    import anyio

    return isinstance(e, (ConnectionError, anyio.ClosedResourceError, anyio.BrokenResourceError,
                          anyio.EndOfStream))  # fmt: skip


@dataclass
class McpBinding(Binding):
    kind = "mcp"
    keys = KEYS
    takes_input = False

    cfg: dict[str, Any] = field(default_factory=dict)
    allow: list[str] | None = None
    prefix: str = ""
    start_timeout_s: float = 20.0
    speak: str = ""
    timeout_s: float | None = None
    progress: ProgressSpec | None = None
    server: McpServer | None = None
    where: str = ""
    remote: str = ""  # the server's name of an offered tool (set on per-tool copies)

    @classmethod
    def load(cls, ctx: LoadContext, raw: dict[str, Any]) -> McpBinding:
        raw = check_keys(ctx, raw, KEYS)
        b = cls(where=ctx.where, timeout_s=raw.get("timeout_s"))
        if ("command" in raw) == ("url" in raw):
            raise ctx.error("command", "give either 'command' (stdio) or 'url' (streamable "
                            "HTTP), not both or neither")  # fmt: skip
        if "command" in raw:
            cmd = raw["command"]
            if not isinstance(cmd, str) or not cmd:
                raise ctx.error("command", "must be a program name or path")
            if shutil.which(cmd) is None:
                raise ctx.error("command", f"{cmd!r} is not an executable on PATH")
            args = raw.get("args", [])
            if not isinstance(args, list):
                raise ctx.error("args", "must be a list of strings")
            env = raw.get("env", {})
            if not isinstance(env, dict):
                raise ctx.error("env", "must map names to values")
            for bad in ("url", "headers"):
                if bad in raw:
                    raise ctx.error(bad, "is for streamable HTTP servers (this one has 'command')")
        else:
            url = raw["url"]
            if not isinstance(url, str) or not re.match(r"^https?://", url):
                raise ctx.error("url", f"must be an http(s) URL (got {url!r})")
            if not isinstance(raw.get("headers", {}), dict):
                raise ctx.error("headers", "must map header names to values")
            for bad in ("args", "env", "cwd"):
                if bad in raw:
                    raise ctx.error(bad, "is for stdio servers (this one has 'url')")
        b.cfg = {k: raw[k] for k in ("command", "args", "env", "cwd", "url", "headers") if k in raw}
        allow = raw.get("allow")
        if allow is not None and not (
            isinstance(allow, list) and all(isinstance(a, str) for a in allow)
        ):
            raise ctx.error("allow", "must be a list of the server's tool names")
        b.allow = allow
        b.prefix = raw.get("prefix", f"{ctx.tool}_")
        if not isinstance(b.prefix, str):
            raise ctx.error("prefix", "must be a string ('' for none)")
        b.start_timeout_s = number(ctx, raw, "start_timeout_s", 20.0, 0.1)
        prog = raw.get("progress") or {}
        if not isinstance(prog, dict) or set(prog) - {"every_s", "speak_every_s", "speak"}:
            raise ctx.error("progress", "takes every_s, speak_every_s and speak")
        b.progress = ProgressSpec(float(prog.get("every_s", 1.0)),
                                  float(prog.get("speak_every_s", 10.0)))  # fmt: skip
        b.speak = str(prog.get("speak", ""))
        try:
            list(string.Formatter().parse(b.speak))
        except ValueError as e:
            raise ctx.error("progress.speak", str(e)) from e
        return b

    def setup(self, env: Any, tool: Any) -> list[Any]:
        from sonic_voice.tools.config import make_tool

        where = f"{self.where}: mcp"
        server = McpServer(tool.name, self.cfg)
        try:
            server.start(self.start_timeout_s)
        except Exception as e:
            what = "command" if "command" in self.cfg else "url"
            raise ToolConfigError(f"{where}.{what}: the server did not start: {e}") from e
        self.server = server
        try:
            by_name = {t.name: t for t in server.tools}
            for a in self.allow or []:
                if a not in by_name:
                    raise ToolConfigError(
                        f"{where}.allow: the server has no tool {a!r} (it has: "
                        f"{', '.join(sorted(by_name)) or 'none'})"
                    )
            offered = []
            for remote in self.allow if self.allow is not None else sorted(by_name):
                t = by_name[remote]
                name = f"{self.prefix}{remote}"
                if not TOOL_NAME_RE.match(name):
                    raise ToolConfigError(f"{where}: server tool {remote!r}: the name {name!r} "
                                          "is not a Nova Sonic tool name ([a-zA-Z0-9_-], "
                                          "at most 64)")  # fmt: skip
                problem = schema_problem(t.inputSchema)
                if problem:
                    raise ToolConfigError(f"{where}: server tool {remote!r}: {problem}")
                b = copy.copy(self)
                b.remote = remote
                desc = (t.description or "").strip() or f"{remote} ({tool.name} server)"
                if tool.description:
                    desc = f"{tool.description.strip()} {desc}"
                offered.append(
                    make_tool(
                        name=name, description=desc, schema=dict(t.inputSchema), binding=b,
                        where=where, requires_confirmation=tool.requires_confirmation,
                        timeout_s=tool.timeout_s, server_wait_s=tool.server_wait_s,
                        moves_robot=tool.moves_robot, cancels_running=tool.cancels_running,
                        cancel_on_barge_in=tool.cancel_on_barge_in, source=tool.source,
                    )
                )  # fmt: skip
            return offered
        except BaseException:
            server.close()
            raise

    async def run(self, call: Call) -> ToolResult:
        server = self.server
        assert server is not None
        if not server.up:
            why = f" ({server.last_error})" if server.last_error else ""
            return _err(call, f"{call.tool.name} is unavailable: its server is restarting"
                        f"{why}. Try again in a moment.", server_absent=True)  # fmt: skip
        args = {k: v for k, v in call.input.items() if k != "confirmed"}

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            data = {"progress": progress, "total": total, "message": message or ""}
            text = ""
            if self.speak:
                try:
                    text = self.speak.format(**data)
                except (KeyError, ValueError, IndexError):
                    text = ""
            call.report_threadsafe({"feedback": data}, text)

        cfut: concurrent.futures.Future = asyncio.run_coroutine_threadsafe(
            server.call(self.remote, args, on_progress), server.loop
        )
        try:
            res = await call.wait(asyncio.wrap_future(cfut))
        except (Interrupted, asyncio.CancelledError):
            cfut.cancel()  # cancels the request at the server
            raise
        except Exception as e:  # noqa: BLE001
            return _err(call, f"{call.tool.name} failed at its server: {_describe(e)}")
        texts = [c.text for c in res.content if getattr(c, "type", "") == "text"]
        content: dict[str, Any] = {"content": texts}
        if res.structuredContent is not None:
            content["structured"] = res.structuredContent
        if res.isError:
            return ToolResult(call.use_id, "error", {"outcome": "error",
                              "error": " ".join(texts) or "the server reported an error",
                              **content})  # fmt: skip
        return ToolResult(call.use_id, "ok", {"outcome": "done", **content})

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


BINDING = McpBinding
