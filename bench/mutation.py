"""Mutation benchmark: do the fast tests notice a realistic one-line bug?

Plants one bug at a time ("a mutant") in a copy of the tree (never the working tree),
runs the fast tests that cover the mutated module, and counts the mutants the tests
kill (a failure, or a hang past the time bound). Aimed at the pure cores and the tools
layer: ``sonic_voice/{audio,sonic,kvs,tools}``.

Two kinds of mutants:

- **generated**, by curated operators over the module's AST (``<`` <-> ``<=``, ``==`` <->
  ``!=``, ``is`` <-> ``is not``, ``in`` <-> ``not in``, ``+`` <-> ``-``, ``*`` <-> ``/``,
  ``and`` <-> ``or``, ``not x`` -> ``x``, an ``if`` condition negated, a number off by one
  (or doubled), ``True`` <-> ``False``, ``return x`` -> ``return None``, a call statement or
  an attribute assignment deleted, ``break`` <-> ``continue``). Logging calls, f-strings,
  docstrings and annotations are left alone (changes there are equivalent mutants). A
  fixed-seed sample of ``--per-module`` sites per module keeps the run repeatable;
- **findings**: the deliberate bugs that once passed the whole suite (shared/findings.md),
  as exact text replacements; one whose text no longer exists is reported "n/a".

A mutant's tests run with ``-x`` (the first failure kills it) under a time bound
(``--bound``, default 4 x the unmutated run + 30 s). The report lists every mutant, the
test that killed it, the survivors with ``file:line`` and the change, then the figures.
Not part of ``make test``: ``make mutate`` or ``python bench/mutation.py``.

    python bench/mutation.py                      # all: 55 mutants, ~18 min (2 cores, loaded)
    python bench/mutation.py --list               # the mutants, no test run
    python bench/mutation.py --area kvs --per-module 2
    python bench/mutation.py --only M017 --keep   # one mutant; keep its copy to inspect
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from _common import ROOT, figure, isolate

AREAS = ("audio", "sonic", "kvs", "tools")

# Module -> the fast test files that cover it (globs under test/; missing ones are
# skipped, so the other developers' new fast tests are picked up by their names), plus
# test/test_mutants_<area>*.py. In the order given (``-x``: the first failure kills), so
# the millisecond tests come first. Slow tests are left out on purpose: nodes, real-time
# audio, browsers, end-to-end, and the full-protocol test_sonic_emulator (100-190 s on
# this 2-core machine under load); the real-WebRTC test_kvs_link only for the master.
_SONIC = [
    "test_sonic_events.py",
    "test_sonic_session_unit.py",  # SonicSession through its opener hook (~0.5 s)
    "test_sonic_unit*.py",
    "test_mutants_sonic*.py",
    "test_sonic_session.py",  # through the real SDK and the HTTP/2 stand-in (~30 s)
]
_KVS = ["test_kvs_emulator.py", "test_kvs_unit*.py", "test_kvs_audio*.py"]
_TOOLS = ["test_tools_config.py", "test_tools_ros.py", "test_tools_unit*.py"]
COVERAGE: dict[str, list[str]] = {
    "audio/pcm.py": ["test_audio.py"],
    "audio/resample.py": ["test_audio.py"],
    # The speaker's queue and the libpulse backend: a private PulseAudio server, null sinks.
    "audio/playback.py": ["test_audio.py", "test_audio_pulse.py"],
    "audio/pulse.py": ["test_audio_pulse.py"],
    "sonic/events.py": _SONIC,
    "sonic/session.py": _SONIC,
    "sonic/transport.py": _SONIC,
    "sonic/tools_seam.py": _SONIC,
    "kvs/jitter.py": ["test_jitter.py"],
    "kvs/audio.py": _KVS,
    "kvs/control.py": _KVS,
    "kvs/settings.py": _KVS,
    "kvs/signing.py": _KVS,
    "kvs/messages.py": _KVS,
    # The master's peer handling runs only with real peers: the re-offer test (~4 s),
    # test_kvs_signaling (~23 s: early candidates of two viewers), test_kvs_link (~110 s).
    "kvs/master.py": [
        *_KVS,
        "test_mutants_kvs*.py",
        "test_kvs_master_peers.py",
        "test_kvs_signaling.py",
        "test_kvs_link.py",
    ],
    "kvs/ice.py": _KVS,
    "kvs/twcc.py": ["test_twcc.py"],
    # Hooks into aiortc: two real peers on loopback (~30 s) and the answer's extensions.
    "kvs/net_hooks.py": ["test_twcc_peers.py", "test_twcc_negotiation.py"],
    "kvs/opus_send.py": ["test_opus_send.py"],
    # The controller's fast tests (test_abr.py also starts real peers and Chromium).
    "kvs/abr.py": ["test_abr_twcc.py"],
    "tools/config.py": _TOOLS,
    "tools/mapping.py": _TOOLS,
    "tools/provider.py": _TOOLS,
}
# Never run: slow or real-time tests that may match a glob above.
SLOW = {"test_sonic_session_node.py", "test_tools_e2e.py", "test_kvs_node.py"}

# Mutants that change no behaviour a caller can see, each with the reason; listed in the
# report, left out of the score. Keyed by (module, operator, code before) so a moved line
# still matches and changed code no longer does.
EQUIVALENT: dict[tuple[str, str, str], tuple[str, str]] = {
    # (module, operator, code before): (text of the source line, why)
    ("sonic/events.py", "And->Or", "t.startswith('{') and 'interrupted' in t"): (
        "if not (t.startswith",
        "a fast path: anything else is rejected by json.loads / .get('interrupted') anyway",
    ),
    ("kvs/jitter.py", "Lt->LtE", "self._losses[0] < now - self.cfg.window_s"): (
        "self._losses[0] < now",
        "equality of two monotonic float times: never happens",
    ),
    ("kvs/jitter.py", "Lt->LtE", "transit < self._base"): (
        "if transit < self._base:",
        "on equality the body assigns the value _base already holds",
    ),
    ("kvs/jitter.py", "delete statement", "self._last_arrival = 0.0"): (
        "self._last_arrival = 0.0",
        "push() sets it before pop_due() can read it (pop_due reads it only once _next_ts, "
        "set by push(), is not None)",
    ),
    ("kvs/ice.py", "number", "2"): (
        "    return 2",
        "_turn_rank's last rank: only the order 0 < 1 < 2 matters, and 3 keeps it",
    ),
    ("tools/provider.py", "delete statement", "timer.cancel()"): (
        "timer.cancel()",
        "the deadline timer of a finished call then only sets a flag nobody reads",
    ),
}

# The deliberate bugs of shared/findings.md that once passed the whole suite.
FINDINGS: list[tuple[str, str, str, str]] = [
    (
        "kvs/audio.py",
        "PacedAudioTrack.flush() keeps the resampler's state (old answer's tail)",
        '        self._buf.clear()\n        self._last_push = float("-inf")\n'
        "        self._resampler.reset()\n",
        '        self._buf.clear()\n        self._last_push = float("-inf")\n',
    ),
    (
        "sonic/session.py",
        "rotate() promotes the new stream without replaying recent audio",
        "        if replay:\n            for frame in self._recent:",
        "        if False:\n            for frame in self._recent:",
    ),
    (
        "sonic/session.py",
        "_dispatch keeps playing audio of an interrupted answer",
        "            if e.content_id in self._interrupted_audio:\n                return\n",
        "",
    ),
    (
        "sonic/session.py",
        "a tool timeout answers 'timeout' but never cancels the tool's task",
        "await asyncio.wait_for(\n                    self.tools.run(use, progress),",
        "await asyncio.wait_for(\n"
        "                    asyncio.shield(self.tools.run(use, progress)),",
    ),
    (
        "sonic/events.py",
        "promptStart without toolUseOutputConfiguration",
        '        body["toolUseOutputConfiguration"] = {"mediaType": "application/json"}\n',
        "",
    ),
    (
        "tools/config.py",
        "goal quaternion with z and w swapped",
        '"z": math.sin(yaw / 2), "w": math.cos(yaw / 2)',
        '"z": math.cos(yaw / 2), "w": math.sin(yaw / 2)',
    ),
    (
        "kvs/master.py",
        "an early ICE candidate filed under another viewer's id (loop variable shadowing)",
        "        for key in list(self._pending):  # expire what waited too long\n"
        "            kept = [(t, c) for t, c in self._pending[key] if t > now]\n"
        "            if kept:\n                self._pending[key] = kept\n"
        "            else:\n                del self._pending[key]\n",
        "        for client in list(self._pending):  # expire what waited too long\n"
        "            kept = [(t, c) for t, c in self._pending[client] if t > now]\n"
        "            if kept:\n                self._pending[client] = kept\n"
        "            else:\n                del self._pending[client]\n",
    ),
]

_LOG_METHODS = {"debug", "info", "warning", "warn", "error", "exception", "critical", "log"}
_SWAP_CMP = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}
_SWAP_BIN = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult}


@dataclass
class Mutant:
    id: str
    module: str  # relative to sonic_voice/
    line: int
    op: str
    before: str
    after: str
    kind: str = "generated"  # or "finding"
    status: str = "pending"  # killed | timeout | survived | n/a | error
    seconds: float = 0.0
    killer: str = ""
    site: int = -1
    _new_source: str = field(default="", repr=False)


# -- generated mutants ----------------------------------------------------------------
Site = tuple[ast.AST, str, Callable[[], ast.AST | None]]


def _is_log_call(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in _LOG_METHODS
    )


def _walk(node: ast.AST, skip: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    """Every node with whether it sits where a mutation is meaningless (logging calls,
    f-strings, annotations, docstrings, ``raise`` messages)."""
    yield node, skip
    for name, value in ast.iter_fields(node):
        sub_skip = skip or name in ("annotation", "returns", "decorator_list", "type_comment")
        if isinstance(node, (ast.JoinedStr, ast.Raise)) or _is_log_call(node):
            sub_skip = True
        items = value if isinstance(value, list) else [value]
        for i, child in enumerate(items):
            if not isinstance(child, ast.AST):
                continue
            doc = (
                name == "body"
                and i == 0
                and isinstance(child, ast.Expr)
                and isinstance(child.value, ast.Constant)
                and isinstance(child.value.value, str)
            )
            yield from _walk(child, sub_skip or doc)


def _sites(tree: ast.Module) -> list[Site]:
    """Mutation sites in a fixed order: (node, operator name, apply) where ``apply``
    mutates the tree in place and returns the new node (for the report)."""
    out: list[Site] = []
    for node, skip in _walk(tree):
        if skip:
            continue
        if isinstance(node, ast.Compare) and len(node.ops) == 1:
            new_op = _SWAP_CMP.get(type(node.ops[0]))
            if new_op is not None:

                def swap_cmp(n=node, o=new_op):
                    n.ops = [o()]
                    return n

                out.append((node, f"{type(node.ops[0]).__name__}->{new_op.__name__}", swap_cmp))
        elif isinstance(node, ast.BinOp) and type(node.op) in _SWAP_BIN:
            new_op = _SWAP_BIN[type(node.op)]

            def swap_bin(n=node, o=new_op):
                n.op = o()
                return n

            out.append((node, f"{type(node.op).__name__}->{new_op.__name__}", swap_bin))
        elif isinstance(node, ast.BoolOp):
            other = ast.Or if isinstance(node.op, ast.And) else ast.And

            def swap_bool(n=node, o=other):
                n.op = o()
                return n

            out.append((node, f"{type(node.op).__name__}->{other.__name__}", swap_bool))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):

            def drop_not(n=node):
                n.op = ast.UAdd()  # replaced below by the operand itself
                return n

            out.append((node, "not x->x", drop_not))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
            if isinstance(node.value, bool):
                continue

            def bump(n=node):
                v = n.value
                n.value = v + 1 if isinstance(v, int) else (v * 2 if v else 1.0)
                return n

            out.append((node, "number", bump))
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):

            def flip(n=node):
                n.value = not n.value
                return n

            out.append((node, "True<->False", flip))
        elif isinstance(node, ast.Return) and node.value is not None:
            if isinstance(node.value, ast.Constant) and node.value.value is None:
                continue

            def ret_none(n=node):
                n.value = ast.Constant(None)
                return n

            out.append((node, "return None", ret_none))
        elif isinstance(node, (ast.If, ast.While)) and not _is_main_guard(node):

            def negate(n=node):
                n.test = ast.UnaryOp(ast.Not(), n.test)
                return n

            out.append((node, "negate condition", negate))
        elif isinstance(node, (ast.Break, ast.Continue)):
            out.append((node, "break<->continue", lambda n=node: n))
        for field_name in ("body", "orelse", "finalbody"):
            body = getattr(node, field_name, None)
            if not isinstance(body, list):
                continue
            for i, stmt in enumerate(body):
                if _deletable(stmt, i, body):

                    def delete(b=body, j=i):
                        b[j] = ast.Pass()
                        return b[j]

                    out.append((stmt, "delete statement", delete))
    return out


def _is_main_guard(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "__name__" in ast.unparse(node.test)


def _deletable(stmt: ast.stmt, i: int, body: list) -> bool:
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, (ast.Call, ast.Await)):
        call = stmt.value.value if isinstance(stmt.value, ast.Await) else stmt.value
        return not _is_log_call(call)
    if isinstance(stmt, (ast.Assign, ast.AugAssign)):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        return all(isinstance(t, (ast.Attribute, ast.Subscript)) for t in targets)
    return False


class _Finish(ast.NodeTransformer):
    """Completes the mutations that need a parent: ``not x -> x`` and break<->continue."""

    def __init__(self, target: ast.AST) -> None:
        self.target = target

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        if node is self.target and isinstance(node.op, ast.UAdd):
            return node.operand
        return node

    def visit_Break(self, node: ast.Break) -> ast.AST:
        return ast.Continue() if node is self.target else node

    def visit_Continue(self, node: ast.Continue) -> ast.AST:
        return ast.Break() if node is self.target else node


def _segment(node: ast.AST, limit: int = 90) -> str:
    try:
        if isinstance(node, (ast.If, ast.While)):
            text = ("if " if isinstance(node, ast.If) else "while ") + ast.unparse(node.test)
        else:
            text = ast.unparse(node)
    except Exception:  # noqa: BLE001
        text = type(node).__name__
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def generated_mutants(module: str, per_module: int, seed: int) -> list[Mutant]:
    src = (ROOT / "sonic_voice" / module).read_text()
    sites = _sites(ast.parse(src))
    rng = random.Random(f"{seed}:{module}")
    chosen = sorted(rng.sample(range(len(sites)), min(per_module, len(sites))))
    out = []
    for k in chosen:
        tree = ast.parse(src)
        node, op, apply = _sites(tree)[k]
        before = _segment(node)
        new = apply()
        if op == "break<->continue":
            new = ast.Continue() if isinstance(node, ast.Break) else ast.Break()
        if isinstance(op, str) and op in ("not x->x", "break<->continue"):
            tree = _Finish(node).visit(tree)
            if op == "not x->x":
                new = node.operand
        ast.fix_missing_locations(tree)
        after = _segment(new)
        out.append(
            Mutant(
                id="",
                module=module,
                line=getattr(node, "lineno", 0),
                op=op,
                before=before,
                after=after,
                site=k,
                _new_source=ast.unparse(tree) + "\n",
            )
        )
    return out


def finding_mutants(modules: set[str]) -> list[Mutant]:
    out = []
    for module, what, old, new in FINDINGS:
        if module not in modules:
            continue
        src = (ROOT / "sonic_voice" / module).read_text()
        line = src[: src.find(old)].count("\n") + 1 if old in src else 0
        m = Mutant(
            id="",
            module=module,
            line=line,
            op="finding",
            before=" ".join(old.split())[:90],
            after=(" ".join(new.split()) or "(deleted)")[:90],
            kind="finding",
            _new_source=src.replace(old, new, 1) if old in src else "",
        )
        m.before = what
        if not m._new_source:
            m.status = "n/a"
        out.append(m)
    return out


# -- running ---------------------------------------------------------------------------
def _tests_for(module: str, tree: Path) -> list[str]:
    files: list[str] = []
    for pattern in COVERAGE.get(module, []):
        for p in sorted((tree / "test").glob(pattern)):
            if p.name not in SLOW and p.name not in files:
                files.append(p.name)
    for p in sorted((tree / "test").glob(f"test_mutants_{module.split('/')[0]}*.py")):
        if p.name not in files:
            files.append(p.name)
    return [f"test/{f}" for f in files]


def _copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", "build", ".pytest_cache", ".ruff_cache"
    )
    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)


def _failed_ids(out: str) -> list[str]:
    """Node ids of pytest's short summary ("FAILED id - reason"); ids may hold spaces
    (parametrized ids), so split on the " - " before the reason. Log lines that start
    with ERROR (captured logging) are not test ids."""
    ids = re.findall(r"^(?:FAILED|ERROR) (\S+\.py(?:::.+?)?)(?: - .*)?$", out, re.M)
    return [i.strip() for i in ids]


def _baseline(tree: Path, tests: list[str]) -> tuple[float, list[str]]:
    """Seconds of the unmutated run, and the tests to leave out: those failing on the
    unmutated code twice in a row (a mutant cannot be judged by them)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    env = {**_env(), "PYTHONPATH": str(tree)}
    t0 = time.monotonic()
    out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.monotonic() - t0
    failing = _failed_ids(out.stdout)
    if out.returncode not in (0, 1):
        sys.exit(f"mutation: the unmutated tests do not run ({' '.join(tests)}):\n{out.stdout}")
    still = [t for t in failing if _pytest(tree, [t], 600)[0] != "survived"]
    print(f"baseline  {seconds:6.1f} s  {' '.join(tests)}", flush=True)
    for t in still:
        print(f"baseline  left out (fails unmutated twice): {t}", flush=True)
    return seconds, still


def _pytest(
    tree: Path, tests: list[str], bound: float, deselect: list[str] = ()
) -> tuple[str, float, str]:
    """(killed|survived|timeout, seconds, first failing test)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    cmd += [f"--deselect={t}" for t in deselect]
    env = {**_env(), "PYTHONPATH": str(tree)}
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=tree,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=bound)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "timeout", time.monotonic() - t0, f"(no result within {bound:.0f} s)"
    except BaseException:  # Ctrl-C: leave no test run behind
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    seconds = time.monotonic() - t0
    if proc.returncode == 0:
        return "survived", seconds, ""
    failed = _failed_ids(out)
    if proc.returncode in (1, 2) and (failed or "error" in out.lower()):
        return "killed", seconds, failed[0] if failed else out.strip().splitlines()[-1][:120]
    return "killed", seconds, f"pytest status {proc.returncode}: {out.strip()[-200:]}"


def _env() -> dict[str, str]:
    return dict(os.environ)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--area", default=",".join(AREAS), help="comma-separated: audio,sonic,...")
    ap.add_argument("--module", default="", help="only modules whose path contains this")
    ap.add_argument("--per-module", type=int, default=3, help="generated mutants per module")
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--no-findings", action="store_true", help="leave out the findings' bugs")
    ap.add_argument("--bound", type=float, default=0, help="seconds per mutant run (0: auto)")
    ap.add_argument("--only", default="", help="comma-separated mutant ids")
    ap.add_argument("--list", action="store_true", help="list the mutants and stop")
    ap.add_argument("--keep", action="store_true", help="keep the mutated copy")
    ap.add_argument("--json", default="", help="write the results here")
    ap.add_argument(
        "--resume",
        default="",
        help="a --json file of an earlier run: keep its kills, run only the rest again "
        "(after adding tests for the survivors)",
    )
    args = ap.parse_args()
    isolate()

    areas = [a.strip() for a in args.area.split(",") if a.strip()]
    bad = [a for a in areas if a not in AREAS]
    if bad:
        sys.exit(f"mutation: unknown area {bad}; choose from {', '.join(AREAS)}")
    modules = [m for m in COVERAGE if m.split("/")[0] in areas and args.module in m]
    mutants: list[Mutant] = []
    for module in modules:
        mutants += generated_mutants(module, args.per_module, args.seed)
    if not args.no_findings:
        mutants += finding_mutants(set(modules))
    for i, m in enumerate(mutants, 1):
        m.id = f"M{i:03d}"
        known = EQUIVALENT.get((m.module, m.op, m.before))
        lines = (ROOT / "sonic_voice" / m.module).read_text().splitlines()
        if known is not None and 0 < m.line <= len(lines) and known[0] in lines[m.line - 1]:
            m.status, m.killer = "equivalent", known[1]
    if args.only:
        wanted = set(args.only.split(","))
        mutants = [m for m in mutants if m.id in wanted]
    if args.resume:
        done = {
            r["id"]: r
            for r in json.loads(Path(args.resume).read_text())
            if r["status"] in ("killed", "timeout")
        }
        for m in mutants:
            r = done.get(m.id)
            if r is not None and (r["module"], r["line"], r["op"]) == (m.module, m.line, m.op):
                m.status, m.seconds, m.killer = r["status"], r["seconds"], r["killer"]
    if args.list:
        for m in mutants:
            print(f"{m.id} {m.module}:{m.line} [{m.op}] {m.before} -> {m.after}")
        return

    # SIGTERM ends the run like Ctrl-C: the running test is killed and the copy removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="sv-mutation-"))
    tree = work / "tree"
    _copy_tree(tree)
    print(f"mutation: {len(mutants)} mutants of {len(modules)} modules; copy in {tree}")
    check = subprocess.run(
        [sys.executable, "-c", "import sonic_voice; print(sonic_voice.__file__)"],
        cwd=tree,
        env={**_env(), "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
    )
    if not check.stdout.startswith(str(tree)):
        sys.exit(f"mutation: the copy does not shadow the installed package: {check.stdout}")

    baseline: dict[tuple[str, ...], tuple[float, list[str]]] = {}
    t_start = time.monotonic()
    try:
        for m in mutants:
            if m.status == "n/a":
                print(f"{m.id} n/a       {m.module} [{m.kind}] {m.before}: text not found")
                continue
            if m.status == "equivalent":
                print(f"{m.id} equivalent {m.module}:{m.line} [{m.op}] {m.before}: {m.killer}")
                continue
            if m.status in ("killed", "timeout"):  # kept from --resume
                print(f"{m.id} {m.status:9s} (earlier run)  {m.module}:{m.line} <- {m.killer}")
                continue
            tests = _tests_for(m.module, tree)
            if not tests:
                m.status, m.killer = "error", "no fast test covers this module"
                continue
            key = tuple(tests)
            if key not in baseline:
                baseline[key] = _baseline(tree, tests)
            seconds, deselect = baseline[key]
            bound = args.bound or 4 * seconds + 30
            target = tree / "sonic_voice" / m.module
            original = target.read_text()
            for _attempt in range(2):
                try:
                    target.write_text(m._new_source)
                    m.status, m.seconds, m.killer = _pytest(tree, tests, bound, deselect)
                finally:
                    target.write_text(original)
                # A kill counts only if the killing test passes on the unmutated code
                # (the real-time tests can fail on a loaded machine).
                if m.status != "killed" or "::" not in m.killer:
                    break
                confirm, _, _ = _pytest(tree, [m.killer], bound)
                if confirm == "survived":
                    break
                m.status = "flaky"
            print(
                f"{m.id} {m.status:9s} {m.seconds:6.1f} s  {m.module}:{m.line} [{m.op}] "
                f"{m.before} -> {m.after}" + (f"  <- {m.killer}" if m.killer else ""),
                flush=True,
            )
    finally:
        if args.keep:
            print(f"mutation: copy kept in {tree}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    ran = [m for m in mutants if m.status in ("killed", "timeout", "survived")]
    flaky = [m for m in mutants if m.status == "flaky"]
    killed = [m for m in ran if m.status in ("killed", "timeout")]
    survivors = [m for m in ran if m.status == "survived"]
    print("\nsurvivors:" if survivors else "\nsurvivors: none")
    for m in survivors:
        print(f"  {m.id} sonic_voice/{m.module}:{m.line} [{m.op}] {m.before} -> {m.after}")
    findings = [m for m in mutants if m.kind == "finding"]
    if findings:
        print("findings' bugs (bug -> first test that fails):")
        for m in findings:
            print(f"  {m.id} {m.status:9s} {m.before} -> {m.killer or '-'}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                [{k: v for k, v in asdict(m).items() if k != "_new_source"} for m in mutants],
                indent=1,
            )
        )
    score = 100.0 * len(killed) / len(ran) if ran else 0.0
    figure("mutation_mutants", len(ran), "mutants", ">= 50")
    figure("mutation_killed", len(killed), "mutants")
    figure("mutation_survivors", len(survivors), "mutants")
    figure("mutation_score", score, "%", ">= 90 %")
    gen = [m for m in ran if m.kind == "generated"]
    gen_killed = [m for m in gen if m.status in ("killed", "timeout")]
    found = [m for m in ran if m.kind == "finding"]
    found_killed = [m for m in found if m.status in ("killed", "timeout")]
    if gen:
        figure("mutation_score_generated", 100.0 * len(gen_killed) / len(gen), "%", ">= 90 %")
    if found:
        figure("mutation_findings_killed", len(found_killed), f"of {len(found)}", "all")
    equivalent = [m for m in mutants if m.status == "equivalent"]
    figure("mutation_equivalent", len(equivalent), "mutants (listed, not scored)")
    figure("mutation_unjudged", len(flaky), "mutants (killer also fails unmutated)")
    figure("mutation_wall", (time.monotonic() - t_start) / 60, "min")


if __name__ == "__main__":
    main()
