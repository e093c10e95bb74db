"""A local full-text index of the operator's documents (no cloud, no model download).

SQLite FTS5 (in the standard library) ranks passages with BM25; PyStemmer's Snowball
stemmers make it language-aware: each passage is indexed as the union of its words'
stems in every configured language (minus that language's stop words), and a question
is stemmed the same way, so "¿A qué hora abre la cafetería?" meets "La cafetería abre a
las 8:00" ("abre" -> "abr", "cafetería" -> "cafeteri"), and an English question meets an
English answer in the same index. Diacritics are folded by FTS5's unicode61 tokenizer.

Why FTS5 rather than bm25s: both rank with BM25; FTS5 needs no numpy/scipy and keeps the
index on disk, so the cache by content hash is one file, opened in ~1 ms, and memory stays
flat as documents grow. Measured by ``bench/tools_beyond.py`` (docstring of
:func:`search` and the bench's note carry the figures).

Documents: ``.md`` / ``.markdown`` split at headings and blank lines (a passage keeps its
heading), ``.txt`` at blank lines, ``.yaml`` / ``.yml`` as FAQ entries (a list of
``{q, a}`` / ``{question, answer}`` mappings, or a mapping of key -> text). Each passage
carries its source: ``file#heading`` or ``file:line``.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

INDEX_VERSION = 3
SUFFIXES = (".md", ".markdown", ".txt", ".yaml", ".yml")

# Snowball algorithm names by ISO 639-1 code (PyStemmer's names).
LANGS = {"en": "english", "es": "spanish", "fr": "french", "de": "german", "it": "italian",
         "pt": "portuguese", "nl": "dutch", "ca": "catalan", "sv": "swedish"}  # fmt: skip

STOPWORDS = {
    "en": set("""a an and are as at be but by can do does for from how i in is it me my of on
        or our please the their there this to us was we what when where which who why will with
        you your""".split()),
    "es": set("""a al algo como con cual cuando de del donde el ella en es esta este hay la las
        le lo los me mi nos o para pero por que qué quien se su sus te tu un una uno y ya
        cuál cuándo dónde cómo""".split()),
}  # fmt: skip

_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass
class Passage:
    text: str
    source: str
    score: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "source": self.source, "score": round(self.score, 3)}


class Analyzer:
    """Words -> stems in each configured language (stop words of that language dropped)."""

    def __init__(self, languages: Iterable[str]) -> None:
        import Stemmer

        self.languages = list(languages)
        self._stemmers = [Stemmer.Stemmer(LANGS[lang]) for lang in self.languages]
        # A word that is a stop word in any configured language is dropped in all of them
        # ("la", "the", "a"): documents and questions mix languages.
        self._stop = set().union(*(STOPWORDS.get(lang, set()) for lang in self.languages))

    def terms(self, text: str) -> list[str]:
        words = [w for w in (w.casefold() for w in _WORD.findall(text)) if w not in self._stop]
        out: list[str] = []
        seen: set[str] = set()
        for stemmer in self._stemmers:
            for s in stemmer.stemWords(words):
                if s not in seen:
                    seen.add(s)
                    out.append(s)
        return out


# ------------------------------------------------------------------------------ documents
def split_document(path: Path, rel: str) -> list[Passage]:
    """One file -> passages with their source."""
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        return _yaml_passages(yaml.safe_load(text), rel)
    out: list[Passage] = []
    heading = ""
    block: list[str] = []
    start = 1

    def flush() -> None:
        body = " ".join(x.strip() for x in block).strip()
        if body:
            src = f"{rel}#{heading}" if heading else f"{rel}:{start}"
            out.append(Passage(f"{heading}: {body}" if heading else body, src))
        block.clear()

    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if path.suffix in (".md", ".markdown") and s.startswith("#"):
            flush()
            heading = s.lstrip("#").strip()
            start = n + 1
        elif not s:
            flush()
            start = n + 1
        else:
            if not block:
                start = n
            block.append(s)
    flush()
    return out


def _yaml_passages(doc: Any, rel: str) -> list[Passage]:
    out: list[Passage] = []
    if isinstance(doc, dict) and isinstance(doc.get("faq"), list):
        doc = doc["faq"]
    if isinstance(doc, list):
        for i, item in enumerate(doc):
            if isinstance(item, dict):
                q = item.get("q", item.get("question", ""))
                a = item.get("a", item.get("answer", ""))
                rest = " ".join(str(v) for k, v in item.items()
                                if k not in ("q", "question", "a", "answer", "id"))  # fmt: skip
                ident = item.get("id", i + 1)
                out.append(Passage(" ".join(x for x in (str(q), str(a), rest) if x).strip(),
                                   f"{rel}#{ident}"))  # fmt: skip
            elif item is not None:
                out.append(Passage(str(item), f"{rel}#{i + 1}"))
    elif isinstance(doc, dict):
        for k, v in doc.items():
            out.append(Passage(f"{k}: {v}", f"{rel}#{k}"))
    return [p for p in out if p.text]


def document_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)


def content_hash(files: list[Path], folder: Path, languages: list[str]) -> str:
    h = hashlib.sha256(f"v{INDEX_VERSION}|{','.join(languages)}".encode())
    for p in files:
        h.update(str(p.relative_to(folder)).encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def cache_dir() -> Path:
    base = os.environ.get("SONIC_VOICE_CACHE") or os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base else Path.home() / ".cache"
    return (root if os.environ.get("SONIC_VOICE_CACHE") else root / "sonic_voice") / "knowledge"


# ------------------------------------------------------------------------------ the index
class KnowledgeIndex:
    """An FTS5 index over passages; thread-safe reads (one connection per thread)."""

    def __init__(self, db_path: Path, analyzer: Analyzer) -> None:
        self.db_path = db_path
        self.analyzer = analyzer
        self._local = threading.local()

    @classmethod
    def build(
        cls, passages: Iterable[Passage], db_path: Path, languages: list[str]
    ) -> KnowledgeIndex:
        """Write a new index file atomically (a crash leaves no half index behind)."""
        analyzer = Analyzer(languages)
        db_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = db_path.with_suffix(f".tmp{os.getpid()}")
        tmp.unlink(missing_ok=True)
        con = sqlite3.connect(tmp)
        try:
            con.execute("PRAGMA journal_mode=OFF")
            con.execute("PRAGMA synchronous=OFF")
            con.execute("CREATE TABLE passages(id INTEGER PRIMARY KEY, text TEXT, source TEXT)")
            con.execute(
                "CREATE VIRTUAL TABLE terms USING fts5(t, content='', "
                "tokenize='unicode61 remove_diacritics 2')"
            )
            rows = ((i, p.text, p.source, " ".join(analyzer.terms(p.text)))
                    for i, p in enumerate(passages, 1))  # fmt: skip
            for i, text, source, terms in rows:
                con.execute("INSERT INTO passages VALUES (?, ?, ?)", (i, text, source))
                con.execute("INSERT INTO terms(rowid, t) VALUES (?, ?)", (i, terms))
            con.execute("INSERT INTO terms(terms) VALUES ('optimize')")
            con.commit()
        finally:
            con.close()
        os.replace(tmp, db_path)
        return cls(db_path, analyzer)

    @classmethod
    def from_folder(
        cls, folder: Path, languages: list[str], cache: Path | None = None
    ) -> tuple[KnowledgeIndex, bool]:
        """The folder's index, from the cache when its content hash is known; (index,
        built_now)."""
        files = document_files(folder)
        digest = content_hash(files, folder, languages)
        db = (cache or cache_dir()) / f"{digest}.sqlite"
        if db.exists():
            return cls(db, Analyzer(languages)), False
        passages = [p for f in files for p in split_document(f, str(f.relative_to(folder)))]
        return cls.build(passages, db, languages), True

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True,
                                  check_same_thread=False)  # fmt: skip
            self._local.con = con
        return con

    def count(self) -> int:
        return self._con().execute("SELECT count(*) FROM passages").fetchone()[0]

    def search(self, query: str, top_k: int = 3, max_chars: int = 1200) -> list[Passage]:
        """The best ``top_k`` passages for ``query``, trimmed to ``max_chars`` in all.

        BM25 over the stems (FTS5 ``bm25()``, lower is better); terms are OR-ed, each
        quoted (no FTS5 syntax from the visitor's words reaches the parser).
        """
        terms = self.analyzer.terms(query)
        if not terms:
            return []
        match = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
        rows = (
            self._con()
            .execute(
                "SELECT p.text, p.source, bm25(terms) AS s FROM terms JOIN passages p "
                "ON p.id = terms.rowid WHERE terms MATCH ? ORDER BY s LIMIT ?",
                (match, top_k),
            )
            .fetchall()
        )
        return trim([Passage(t, src, -s) for t, src, s in rows], max_chars)

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None


def trim(passages: list[Passage], max_chars: int) -> list[Passage]:
    """Keep passages in rank order within ``max_chars`` (the last one cut at a word)."""
    out: list[Passage] = []
    left = max_chars
    for p in passages:
        if left <= 40:
            break
        text = p.text
        if len(text) > left:
            text = text[:left].rsplit(" ", 1)[0] + " …"
        out.append(Passage(text, p.source, p.score))
        left -= len(text)
    return out
