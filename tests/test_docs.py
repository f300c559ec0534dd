"""The examples in README.md and docs/*.md, run as written, so that they cannot rot.

Every ```bash, ```sh or ```python block in those files carries a marker on the line right before its fence:

    <!-- runnable -->                  this test runs it
    <!-- not-runnable: REASON -->      it is not run, and REASON says why (needs the hub, a GPU, Docker, ...)

A ```text (or bare ```) block may follow a runnable block as a sample of its output, marked

    <!-- output -->                    each non-blank line of the sample must be a line the block printed
                                       (runs of spaces compare as one space; `…` stands for any text)

Unmarked ```text and bare blocks (diagrams, file formats, output not worth checking) are ignored.

The runnable blocks run in file order, one document after another, against one real `loragen serve` (the demo
bundle, the embedded cache) on a free port: `127.0.0.1:8000` and `localhost:8000` in a block become its address.
The blocks of one document share a scratch directory that looks like the repository root to them (.venv,
generator, examples, ... are links into the checkout), so a file an earlier block wrote is there for a later
one and nothing is written into the checkout. A bash block runs under `set -euo pipefail` in a bash of its own;
the shell variables earlier blocks of the same document set are set again first, as in one terminal. A python
block runs as a script with the venv's python.

Blocks not run (marked not-runnable) are listed at the end of the test session.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.service_server import ServiceProcess

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = VENV_BIN / "python" if (VENV_BIN / "python").exists() else Path(sys.executable)

CODE_LANGS = {"bash", "sh", "shell", "python", "py"}  # blocks that must be marked
OUTPUT_LANGS = {"", "text"}
MARKER = re.compile(r"^<!--\s*(runnable|not-runnable|output)\b\s*(?::\s*(.*?))?\s*-->\s*$")
FENCE = re.compile(r"^( {0,3})(`{3,})\s*([^`\s]*)[^`]*$")
SERVER_ADDRESS = re.compile(r"\b(?:127\.0\.0\.1|localhost):8000\b")
BLOCK_TIMEOUT_S = 240


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    marker: str | None  # runnable | not-runnable | output | None
    reason: str
    previous: Block | None  # the fenced block before this one in the same file

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def doc(self) -> str:
        return str(self.path.relative_to(ROOT))


def parse(path: Path) -> tuple[list[Block], list[str]]:
    """Every fenced block of a markdown file, and the problems with its markers (a marker that no fence follows)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = MARKER.match(line.strip())
        if marker and not (i + 1 < len(lines) and FENCE.match(lines[i + 1])):
            problems.append(f"{path.relative_to(ROOT)}:{i + 1}: a marker must be on the line right before a fence")
        fence = FENCE.match(line)
        if not fence:
            i += 1
            continue
        indent, ticks, lang = len(fence.group(1)), fence.group(2), fence.group(3).lower()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not re.match(rf"^ {{0,3}}{ticks}`*\s*$", lines[j]):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        previous_marker = MARKER.match(lines[i - 1].strip()) if i > 0 else None
        blocks.append(Block(path, i + 1, lang, "\n".join(body) + "\n",
                            previous_marker.group(1) if previous_marker else None,
                            (previous_marker.group(2) or "").strip() if previous_marker else "",
                            blocks[-1] if blocks else None))
        i = j + 1
    return blocks, problems


def all_blocks() -> list[Block]:
    return [b for path in DOCS for b in parse(path)[0]]


RUNNABLE = [b for b in all_blocks() if b.marker == "runnable"]
OUTPUT_OF = {b.previous.where: b for b in all_blocks() if b.marker == "output" and b.previous is not None}


# ---------------------------------------------------------------------------------------------------------------
# every example is marked; links resolve; the README is the front door


def test_every_code_block_is_marked_runnable_or_says_why_not():
    problems: list[str] = []
    for path in DOCS:
        blocks, marker_problems = parse(path)
        problems += marker_problems
        for b in blocks:
            if b.lang in CODE_LANGS:
                if b.marker not in ("runnable", "not-runnable"):
                    problems.append(f"{b.where}: a ```{b.lang} block needs <!-- runnable --> or "
                                    "<!-- not-runnable: REASON --> on the line before it")
                elif b.marker == "not-runnable" and not b.reason:
                    problems.append(f"{b.where}: <!-- not-runnable --> needs a reason: <!-- not-runnable: REASON -->")
            elif b.marker in ("runnable", "not-runnable"):
                problems.append(f"{b.where}: only bash, sh or python blocks are run; this one is ```{b.lang}")
            if b.marker == "output":
                if b.lang not in OUTPUT_LANGS:
                    problems.append(f"{b.where}: an output sample is a ```text or bare block, not ```{b.lang}")
                if b.previous is None or b.previous.marker != "runnable":
                    problems.append(f"{b.where}: an output sample must follow a runnable block")
    assert not problems, "\n".join(problems)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]|\[([^]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and (m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_links_between_the_docs_resolve():
    problems = []
    for path in DOCS:
        text = re.sub(r"(?ms)^ {0,3}```.*?^ {0,3}```", "", path.read_text(encoding="utf-8"))
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                problems.append(f"{path.relative_to(ROOT)}: link to {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                problems.append(f"{path.relative_to(ROOT)}: link to {target}: no such heading")
    assert not problems, "\n".join(problems)


def test_readme_is_the_front_door_and_names_the_test_command_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200, "README.md is the front door: keep it to 200 lines, move details to docs/"
    ci_command = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert ci_command == [".venv/bin/python -m pytest -q"]
    assert "```bash\n.venv/bin/python -m pytest -q\n```" in readme
    assert "```bash\nbash scripts/install.sh && .venv/bin/loragen serve\n```" in readme


# ---------------------------------------------------------------------------------------------------------------
# running the runnable blocks


class _NotRunReport:
    """Lists, at the end of the session, the blocks that were not run and why."""

    def __init__(self) -> None:
        self.not_run: dict[str, list[str]] = {}

    def add(self, reason: str, where: str) -> None:
        self.not_run.setdefault(reason, []).append(where)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.not_run:
            terminalreporter.section("examples in README.md and docs/ not run")
            for reason, where in self.not_run.items():
                terminalreporter.write_line(f"{reason}: {', '.join(where)}")


@pytest.fixture(scope="module", autouse=True)
def not_run_report(request):
    report = _NotRunReport()
    for b in all_blocks():
        if b.marker == "not-runnable":
            report.add(b.reason, b.where)
    name = "loragen-docs-not-run"
    if request.config.pluginmanager.get_plugin(name) is None:
        request.config.pluginmanager.register(report, name)
    print("\n".join(f"not run: {reason}: {', '.join(where)}" for reason, where in report.not_run.items()))
    return request.config.pluginmanager.get_plugin(name)


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory):
    server = ServiceProcess({}, tmp_path_factory.mktemp("docs-serve") / "serve.log")  # no --checkpoint: the demo
    yield server
    server.stop()


@dataclass
class _Workspace:
    cwd: Path
    state: Path  # the shell variables the document's bash blocks have set so far
    failed: str | None = None


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory):
    spaces: dict[str, _Workspace] = {}

    def get(doc: str) -> _Workspace:
        if doc not in spaces:
            base = tmp_path_factory.mktemp("docs-" + re.sub(r"\W", "-", doc))
            cwd = base / "repo"
            cwd.mkdir()
            for entry in ROOT.iterdir():  # a scratch copy of the repository root, made of links
                if entry.name not in (".git", ".pytest_cache"):
                    (cwd / entry.name).symlink_to(entry)
            spaces[doc] = _Workspace(cwd, base / "shell-state.sh")
        return spaces[doc]

    return get


def _bash_script(block_text: str, state: Path) -> str:
    """The block under `set -euo pipefail`, after the variables earlier blocks set, saving its own afterwards."""
    q = shlex.quote(str(state))
    return (
        "__docs_base=\" $(compgen -v | tr '\\n' ' ') \"\n"
        f"if [ -f {q} ]; then source {q}; fi\n"
        "set -euo pipefail\n"
        f"{block_text}\n"
        "set +u\n"
        f"for __docs_v in $(compgen -v); do\n"
        "  case \"$__docs_base\" in *\" $__docs_v \"*) continue;; esac\n"
        "  case \"$__docs_v\" in __docs_*|BASH*|FUNCNAME|PIPESTATUS|REPLY|OPT*|_) continue;; esac\n"
        f"  declare -p \"$__docs_v\" >> {q}.new\n"
        f"done\ntouch {q}.new && mv {q}.new {q}\n"
    )


def _check_sample(block: Block, stdout: str) -> None:
    sample = OUTPUT_OF.get(block.where)
    if sample is None:
        return
    printed = [" ".join(line.split()) for line in stdout.splitlines()]
    for line in sample.text.splitlines():
        expected = " ".join(line.split())
        if not expected:
            continue
        pattern = re.compile(".*".join(re.escape(part) for part in expected.split("…")))
        if not any(pattern.fullmatch(p) for p in printed):
            pytest.fail(f"{sample.where}: the sample output line {line.strip()!r} is not a line that {block.where} "
                        f"printed; it printed:\n{stdout[-4000:]}", pytrace=False)


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.where for b in RUNNABLE])
def test_runnable_block(block: Block, docs_server, workspaces, not_run_report):
    space = workspaces(block.doc)
    if space.failed:
        pytest.skip(f"{block.where}: not run, since {space.failed} (earlier in {block.doc}) failed")
    text = SERVER_ADDRESS.sub(f"127.0.0.1:{docs_server.port}", block.text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAGEN_")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               REPO=str(ROOT))
    if block.lang in ("python", "py"):
        script = space.state.with_name(f"block-{block.line}.py")
        script.write_text(text, encoding="utf-8")
        cmd = [str(PYTHON), str(script)]
    else:
        cmd = ["bash", "-c", _bash_script(text, space.state)]
    try:
        out = subprocess.run(cmd, cwd=space.cwd, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        space.failed = block.where
        pytest.fail(f"{block.where}: still running after {BLOCK_TIMEOUT_S} s", pytrace=False)
    if out.returncode != 0:
        space.failed = block.where
        pytest.fail(f"{block.where}: exit status {out.returncode}\n--- the block ---\n{block.text}"
                    f"--- stderr ---\n{out.stderr[-4000:]}\n--- stdout ---\n{out.stdout[-2000:]}", pytrace=False)
    _check_sample(block, out.stdout)
