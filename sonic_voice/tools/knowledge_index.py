"""A local full-text index of the operator's documents (no cloud, no model download).

bm25s ranks passages with BM25 (sparse score matrices in numpy); PyStemmer's Snowball
stemmers make it language-aware: each passage is indexed as the union of its words' stems
in every configured language (stop words of any of them dropped), and a question is
stemmed the same way, so "¿A qué hora abre la cafetería?" meets "La cafetería abre a las
8:00" ("abre" -> "abr", "cafetería" -> "cafet"), and an English question meets an English
answer in the same index. Stems are folded to ASCII ("recepción" = "recepcion").

Why bm25s rather than SQLite FTS5 (both BM25, neither needs a model download): FTS5
scores every passage that holds any query word, then sorts them, so a question made of
common words costs time in proportion to the corpus. Measured here on a synthetic
bilingual corpus (2 cores, loaded): FTS5 32 ms p50 / 195 ms p99 at 10 k passages (so
~0.3 s at 100 k); bm25s sums precomputed sparse score columns and takes the top k with
argpartition: at 100 k passages 3.8 ms p50 wall with 0.6 ms p99 of CPU (the wall tail,
60 ms p99, was waiting for a core at a load average of 12 on 2 cores); building that index
took 69 s and 200 MB at start-up, once, then 1 s to open from the cache
(``bench/tools_beyond.py`` prints the current figures). It needs only numpy (already
pinned); its index is a folder of arrays, memory-mapped.

Documents: ``.md`` / ``.markdown`` split at headings and blank lines (a passage keeps its
heading), ``.txt`` at blank lines, ``.yaml`` / ``.yml`` as FAQ entries (a list of
``{q, a}`` / ``{question, answer}`` mappings, or a mapping of key -> text). Each passage
carries its source: ``file#heading`` or ``file:line``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

INDEX_VERSION = 5
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


def _fold(s: str) -> str:
    """Strip diacritics (after stemming: the Snowball stemmers expect them)."""
    if s.isascii():
        return s
    return "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))


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
        self._cache: dict[str, tuple[str, ...]] = {}

    def _stems(self, word: str) -> tuple[str, ...]:
        """A word's stems in every language, once each (cached: vocabularies are Zipfian,
        so most words repeat; this made indexing 100 k passages several times faster)."""
        stems = self._cache.get(word)
        if stems is None:
            stems = tuple(dict.fromkeys(_fold(st.stemWord(word)) for st in self._stemmers))
            if len(self._cache) < 500_000:
                self._cache[word] = stems
        return stems

    def terms(self, text: str, unique: bool = True) -> list[str]:
        """The stems of ``text``; ``unique=False`` keeps repeats (term frequency, for
        documents), ``True`` gives each once (questions)."""
        out: list[str] = []
        for w in _WORD.findall(text):
            w = w.casefold()
            if w not in self._stop:
                out.extend(self._stems(w))
        return list(dict.fromkeys(out)) if unique else out


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
    """BM25 (bm25s: sparse score matrices in numpy) over the passages' stems.

    Saved per content hash as a folder (bm25s's arrays, memory-mapped on load, and the
    passages as JSON), so a robot that restarts with the same documents opens its index in
    milliseconds and keeps only the pages it touches in memory.
    """

    def __init__(self, folder: Path, analyzer: Analyzer) -> None:
        import bm25s

        self.folder = folder
        self.analyzer = analyzer
        self.retriever = bm25s.BM25.load(str(folder / "bm25"), mmap=True)
        data = json.loads((folder / "passages.json").read_text(encoding="utf-8"))
        self.passages = [Passage(t, s) for t, s in data]
        self._lock = threading.Lock()

    @property
    def db_path(self) -> Path:
        return self.folder

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())

    @classmethod
    def build(
        cls, passages: Iterable[Passage], folder: Path, languages: list[str]
    ) -> KnowledgeIndex:
        """Write a new index folder atomically (a crash leaves no half index behind)."""
        import bm25s

        analyzer = Analyzer(languages)
        plist = list(passages)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        retriever = bm25s.BM25()
        # A passage with no indexable word still takes its row (ids stay aligned).
        retriever.index(
            [analyzer.terms(p.text, unique=False) or ["\x00"] for p in plist], show_progress=False
        )
        retriever.save(str(tmp / "bm25"))
        (tmp / "passages.json").write_text(
            json.dumps([[p.text, p.source] for p in plist], ensure_ascii=False), encoding="utf-8"
        )
        try:
            os.replace(tmp, folder)
        except OSError:  # another process built it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(folder, analyzer)

    @classmethod
    def from_folder(
        cls, folder: Path, languages: list[str], cache: Path | None = None
    ) -> tuple[KnowledgeIndex, bool]:
        """The folder's index, from the cache when its content hash is known; (index,
        built_now)."""
        files = document_files(folder)
        digest = content_hash(files, folder, languages)
        target = (cache or cache_dir()) / digest
        if (target / "passages.json").exists():
            return cls(target, Analyzer(languages)), False
        passages = [p for f in files for p in split_document(f, str(f.relative_to(folder)))]
        return cls.build(passages, target, languages), True

    def count(self) -> int:
        return len(self.passages)

    def search(self, query: str, top_k: int = 3, max_chars: int = 1200) -> list[Passage]:
        """The best ``top_k`` passages for ``query`` (BM25 > 0), trimmed to ``max_chars``."""
        vocab = self.retriever.vocab_dict
        terms = [t for t in self.analyzer.terms(query) if t in vocab]
        if not terms or not self.passages:
            return []
        k = min(top_k, len(self.passages))
        with self._lock:  # bm25s keeps per-call state on the retriever
            ids, scores = self.retriever.retrieve(
                [terms], k=k, show_progress=False, n_threads=1, return_as="tuple"
            )
        out = [
            Passage(self.passages[i].text, self.passages[i].source, float(s))
            for i, s in zip(ids[0].tolist(), scores[0].tolist(), strict=True)
            if s > 0
        ]
        return trim(out, max_chars)

    def close(self) -> None:
        pass


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
