"""``knowledge:`` answers from the operator's documents (retrieval for the model to read).

Embedded (default; no cloud, no model download)::

    knowledge:
      documents: knowledge/        # folder of .md/.txt/.yaml FAQ files, relative to this file
      languages: [es, en]          # stemmers for documents and questions (Snowball names)
      top_k: 3
      max_chars: 1200              # all passages together: short enough to speak from

Online, Amazon Bedrock Knowledge Bases ``Retrieve`` (credentials from the usual chain)::

    knowledge:
      bedrock:
        knowledge_base_id: KB12345678
        number_of_results: 4
        filter: {equals: {key: lang, value: es}}   # Retrieve's metadata filter, as is
        region: us-east-1          # optional; endpoint_url: for a stand-in or PrivateLink
      max_chars: 1200

Default input: ``{query: string}``. The result holds the passages with their sources; the
session's log (``tool_events``) shows which passage answered.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sonic_voice.sonic.tools_seam import ToolResult
from sonic_voice.tools.bindings.base import Binding, Call, LoadContext, check_keys, number
from sonic_voice.tools.bindings.base import error as _err

log = logging.getLogger(__name__)

KEYS = frozenset({"documents", "languages", "top_k", "max_chars", "bedrock", "cache_dir",
                  "timeout_s"})  # fmt: skip
BEDROCK_KEYS = frozenset({"knowledge_base_id", "number_of_results", "filter", "region",
                          "endpoint_url"})  # fmt: skip
DEFAULT_INPUT = {
    "type": "object",
    "properties": {
        "query": {"type": "string", "minLength": 1,
                  "description": "The visitor's question, in their words and language."}
    },
    "required": ["query"],
}  # fmt: skip


@dataclass
class KnowledgeBinding(Binding):
    kind = "knowledge"
    keys = KEYS
    default_input = DEFAULT_INPUT

    documents: Path | None = None
    languages: list[str] = field(default_factory=lambda: ["en", "es"])
    top_k: int = 3
    max_chars: int = 1200
    bedrock: dict[str, Any] | None = None
    cache: Path | None = None
    timeout_s: float | None = None
    index: Any = None
    client: Any = None
    built_s: float = 0.0

    @classmethod
    def load(cls, ctx: LoadContext, raw: dict[str, Any]) -> KnowledgeBinding:
        from sonic_voice.tools.knowledge_index import LANGS

        raw = check_keys(ctx, raw, KEYS)
        b = cls(timeout_s=raw.get("timeout_s"))
        b.top_k = int(number(ctx, raw, "top_k", 3, 1))
        b.max_chars = int(number(ctx, raw, "max_chars", 1200, 100))
        if "query" not in ctx.props:
            raise ctx.error("", "the input schema needs a 'query' string property")
        if ("documents" in raw) == ("bedrock" in raw):
            raise ctx.error("documents", "give either 'documents' (a local folder) or "
                            "'bedrock' (a Knowledge Base), not both or neither")  # fmt: skip
        langs = raw.get("languages", ["en", "es"])
        if not isinstance(langs, list) or not langs:
            raise ctx.error("languages", "must be a non-empty list (e.g. [es, en])")
        for lang in langs:
            if lang not in LANGS:
                raise ctx.error("languages", f"{lang!r} is not one of {sorted(LANGS)}")
        b.languages = [str(x) for x in langs]
        if "documents" in raw:
            d = raw["documents"]
            if not isinstance(d, str) or not d:
                raise ctx.error("documents", "must be a folder path")
            folder = (ctx.base_dir / d).resolve()
            if not folder.is_dir():
                raise ctx.error("documents", f"folder {folder} does not exist")
            from sonic_voice.tools.knowledge_index import document_files

            if not document_files(folder):
                raise ctx.error("documents", f"{folder} holds no .md, .txt or .yaml file")
            b.documents = folder
            if "cache_dir" in raw:
                b.cache = (ctx.base_dir / str(raw["cache_dir"])).resolve()
        else:
            br = raw["bedrock"]
            if not isinstance(br, dict):
                raise ctx.error("bedrock", "must be a mapping")
            bad = set(br) - BEDROCK_KEYS
            if bad:
                raise ctx.error(f"bedrock.{sorted(bad)[0]}",
                                f"unknown key (allowed: {sorted(BEDROCK_KEYS)})")  # fmt: skip
            kb = br.get("knowledge_base_id")
            if not isinstance(kb, str) or not re.fullmatch(r"[0-9a-zA-Z]{10}", kb):
                raise ctx.error("bedrock.knowledge_base_id",
                                f"must be a 10-character id (got {kb!r})")  # fmt: skip
            n = br.get("number_of_results", 4)
            if not isinstance(n, int) or not 1 <= n <= 100:
                raise ctx.error("bedrock.number_of_results", f"must be 1-100 (got {n!r})")
            if "filter" in br and not isinstance(br["filter"], dict):
                raise ctx.error("bedrock.filter", "must be a Retrieve metadata filter mapping")
            b.bedrock = dict(br)
        return b

    def setup(self, env: Any, tool: Any) -> list[Any]:
        import time

        if self.documents is not None:
            from sonic_voice.tools.knowledge_index import KnowledgeIndex

            t0 = time.perf_counter()
            self.index, built = KnowledgeIndex.from_folder(
                self.documents, self.languages, self.cache
            )
            self.built_s = time.perf_counter() - t0
            log.info("knowledge %s: %d passages from %s (%s in %.0f ms)", tool.name,
                     self.index.count(), self.documents, "built" if built else "cached",
                     self.built_s * 1000)  # fmt: skip
        else:
            import boto3

            br = self.bedrock or {}
            self.client = boto3.client(
                "bedrock-agent-runtime",
                region_name=br.get("region"),
                endpoint_url=br.get("endpoint_url"),
            )
        return [tool]

    async def run(self, call: Call) -> ToolResult:
        query = str(call.input["query"])
        if self.index is not None:
            # Milliseconds even at 100 k passages (bench/tools_beyond.py), but on a worker
            # thread all the same: the loop keeps the audio moving, and a cancel or the
            # deadline answers at once.
            found = await call.wait(
                asyncio.to_thread(self.index.search, query, self.top_k, self.max_chars)
            )
            passages = [p.as_dict() for p in found]
            where = str(self.documents)
        else:
            passages = await call.wait(asyncio.to_thread(self._retrieve, query))
            where = f"knowledge base {(self.bedrock or {})['knowledge_base_id']}"
        if passages:
            log.info("knowledge %s: %r -> %s", call.tool.name, query,
                     ", ".join(p["source"] for p in passages))  # fmt: skip
        else:
            return _err(call, f"Nothing in {call.tool.name}'s documents answers that.",
                        outcome="not_found", query=query)  # fmt: skip
        return ToolResult(
            call.use_id, "ok", {"outcome": "found", "query": query, "passages": passages,
                                "from": where}
        )  # fmt: skip

    def _retrieve(self, query: str) -> list[dict[str, Any]]:
        from sonic_voice.tools.knowledge_index import Passage, trim

        br = self.bedrock or {}
        vector: dict[str, Any] = {"numberOfResults": int(br.get("number_of_results", 4))}
        if br.get("filter"):
            vector["filter"] = br["filter"]
        resp = self.client.retrieve(
            knowledgeBaseId=br["knowledge_base_id"],
            retrievalQuery={"text": query},
            retrievalConfiguration={"vectorSearchConfiguration": vector},
        )
        out = []
        for r in resp.get("retrievalResults", []):
            loc = r.get("location") or {}
            src = (
                (loc.get("s3Location") or {}).get("uri")
                or (loc.get("webLocation") or {}).get("url")
                or loc.get("type", "")
            )
            out.append(Passage(r["content"].get("text", ""), src, float(r.get("score", 0.0))))
        return [p.as_dict() for p in trim(out[: self.top_k], self.max_chars)]

    def close(self) -> None:
        if self.index is not None:
            self.index.close()


BINDING = KnowledgeBinding
