"""Loopback stand-in for Bedrock ``ConverseStream`` and Knowledge Bases ``Retrieve``.

Real boto3 (and Strands on top of it) talks to it with an endpoint override; requests must
carry a SigV4 ``Authorization`` header (checked for shape, as the service would reject an
unsigned call). Everything seen is recorded for tests to assert on.

ConverseStream (``POST /model/{modelId}/converse-stream``) answers each request with the
next scripted step, framed as the service frames it (``application/vnd.amazon.eventstream``:
messageStart, contentBlockStart/Delta/Stop, messageStop, metadata)::

    [{"tool_use": {"name": "time_get_current_time", "input": {"timezone": "UTC"}}},
     {"text": "It is {tool_result} in UTC.", "delay_s": 0.0}]

``{tool_result}`` is replaced by the text of the last toolResult the agent sent.

Retrieve (``POST /knowledgebases/{kbId}/retrieve``): BM25 (the package's own index) over a
folder per knowledge base id; ``delay_s`` holds answers back (timeouts, cancellation).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from smithy_aws_event_stream.events import EventMessage


def _event(event_type: str, body: dict[str, Any]) -> bytes:
    return EventMessage(
        headers={
            ":message-type": "event",
            ":event-type": event_type,
            ":content-type": "application/json",
        },
        payload=json.dumps(body).encode(),
    ).encode()


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response(
        {"message": message}, status=status, headers={"x-amzn-ErrorType": kind}
    )


@dataclass
class AgentsEmulator:
    script: list[dict[str, Any]] = field(default_factory=list)
    knowledge_bases: dict[str, Path] = field(default_factory=dict)
    delay_s: float = 0.0  # Retrieve answers held back this long
    converse_requests: list[dict[str, Any]] = field(default_factory=list)
    retrieve_requests: list[dict[str, Any]] = field(default_factory=list)
    aborted: int = 0  # requests whose client went away before the answer
    _step: int = 0
    _indexes: dict[str, Any] = field(default_factory=dict)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/model/{model}/converse-stream", self.converse_stream)
        app.router.add_post("/knowledgebases/{kb}/retrieve", self.retrieve)
        return app

    @staticmethod
    def _signed(request: web.Request) -> bool:
        return request.headers.get("Authorization", "").startswith("AWS4-HMAC-SHA256 Credential=")

    # ------------------------------------------------------------------ Retrieve
    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        if not self._signed(request):
            return _error(403, "AccessDeniedException", "missing SigV4 signature")
        kb = request.match_info["kb"]
        body = await request.json()
        self.retrieve_requests.append({"kb": kb, "body": body, "t": time.monotonic()})
        folder = self.knowledge_bases.get(kb)
        if folder is None:
            return _error(404, "ResourceNotFoundException", f"knowledge base {kb} not found")
        try:
            query = body["retrievalQuery"]["text"]
        except (KeyError, TypeError):
            return _error(400, "ValidationException", "retrievalQuery.text is required")
        vector = (body.get("retrievalConfiguration") or {}).get("vectorSearchConfiguration", {})
        n = int(vector.get("numberOfResults", 5))
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.aborted += 1
            raise
        index = self._index(kb, folder)
        found = index.search(query, n, 100_000)
        return web.json_response(
            {
                "retrievalResults": [
                    {
                        "content": {"text": p.text, "type": "TEXT"},
                        "location": {"type": "S3",
                                     "s3Location": {"uri": f"s3://{kb.lower()}/{p.source}"}},
                        "score": round(min(1.0, p.score / 10), 4),
                        "metadata": {"x-amz-bedrock-kb-source-uri": p.source},
                    }
                    for p in found
                ]
            }
        )  # fmt: skip

    def _index(self, kb: str, folder: Path) -> Any:
        if kb not in self._indexes:
            import tempfile

            from sonic_voice.tools.knowledge_index import KnowledgeIndex

            cache = Path(tempfile.mkdtemp(prefix="kb-standin-"))
            self._indexes[kb] = KnowledgeIndex.from_folder(folder, ["en", "es"], cache)[0]
        return self._indexes[kb]

    # ------------------------------------------------------------------ ConverseStream
    async def converse_stream(self, request: web.Request) -> web.StreamResponse:
        if not self._signed(request):
            return _error(403, "AccessDeniedException", "missing SigV4 signature")
        body = await request.json()
        self.converse_requests.append(
            {"model": request.match_info["model"], "body": body, "t": time.monotonic()}
        )
        if self._step >= len(self.script):
            return _error(400, "ValidationException", "the stand-in's script has no more turns")
        step = self.script[self._step]
        self._step += 1
        resp = web.StreamResponse(
            status=200,
            headers={"Content-Type": "application/vnd.amazon.eventstream",
                     "x-amzn-RequestId": str(uuid.uuid4())},
        )  # fmt: skip
        await resp.prepare(request)
        try:
            await resp.write(_event("messageStart", {"role": "assistant"}))
            if step.get("delay_s"):
                await asyncio.sleep(float(step["delay_s"]))
            idx = 0
            if "text" in step:
                text = str(step["text"]).replace("{tool_result}", _last_tool_result(body))
                await resp.write(
                    _event("contentBlockDelta", {"contentBlockIndex": idx, "delta": {"text": text}})
                )
                await resp.write(_event("contentBlockStop", {"contentBlockIndex": idx}))
                idx += 1
            if "tool_use" in step:
                tu = step["tool_use"]
                use_id = tu.get("id", f"tooluse_{uuid.uuid4().hex[:12]}")
                await resp.write(
                    _event(
                        "contentBlockStart",
                        {
                            "contentBlockIndex": idx,
                            "start": {"toolUse": {"toolUseId": use_id, "name": tu["name"]}},
                        },
                    )
                )
                await resp.write(
                    _event(
                        "contentBlockDelta",
                        {
                            "contentBlockIndex": idx,
                            "delta": {"toolUse": {"input": json.dumps(tu.get("input", {}))}},
                        },
                    )
                )
                await resp.write(_event("contentBlockStop", {"contentBlockIndex": idx}))
            stop = "tool_use" if "tool_use" in step else "end_turn"
            await resp.write(_event("messageStop", {"stopReason": stop}))
            await resp.write(_event("metadata", {
                "usage": {"inputTokens": 10, "outputTokens": 5, "totalTokens": 15},
                "metrics": {"latencyMs": 1}}))  # fmt: skip
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            self.aborted += 1
            raise
        return resp


def _last_tool_result(body: dict[str, Any]) -> str:
    for msg in reversed(body.get("messages", [])):
        for block in msg.get("content", []):
            tr = block.get("toolResult")
            if tr:
                parts = []
                for c in tr.get("content", []):
                    if "text" in c:
                        parts.append(c["text"])
                    elif "json" in c:
                        parts.append(json.dumps(c["json"]))
                return " ".join(parts)
    return ""


class AgentsEmulatorThread:
    """The stand-in on its own loop thread, on 127.0.0.1 (an ephemeral port)."""

    def __init__(self, emulator: AgentsEmulator | None = None, **kwargs: Any) -> None:
        self.emulator = emulator or AgentsEmulator(**kwargs)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="agents-standin",
                                        daemon=True)  # fmt: skip
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> AgentsEmulatorThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(
            self.emulator.app(), handle_signals=False, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    def __enter__(self) -> AgentsEmulatorThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
