"""The README's snippets run as written: every ```python and ```bash block is extracted here and either run or
classified (setup, GPU-only, long benchmarks, marked fragments), so a new snippet cannot escape the check. The
command lines run in-process through ``main``; the walkthrough (the demo, then the Library-use code on the plan it
wrote, then the commands that use it) is slow."""

import re
import shlex
from pathlib import Path

import pytest

from invardiff.cli.main import main


README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPET = re.compile(r"(<!-- readme-test: (?P<mark>\w+) -->\n)?```(?P<lang>python|bash)\n(?P<body>.*?)```", re.S)
# Command lines not run here, by what they start with, and why.
NOT_RUN = {
    "python3 -m venv": "setup: creates a virtual environment and installs packages",
    "pip install": "setup: installs packages",
    "invardiff bench ": "the speed-quality sweep takes 20+ minutes",
    "invardiff bench-engine": "the engine benchmark takes 10+ minutes on CPU (GPU configs need CUDA)",
    "ray start": "starts a Ray cluster node (head or worker machine)",
}
# Command lines that need the slow walkthrough: the demo, calibrations, and what uses their files.
SLOW = (
    "invardiff demo",
    "invardiff calibrate",
    "printf ",
    "out/demo/",
    "flux-fast.rates.npz",
    "resample-plan flux-fast.json",  # reads the plan a calibrate line writes
    "my-dit",  # the own-model lines: the pipeline a Python snippet saves, the plans its calibrate lines write
)
REPOSITORY = README.parent


def snippets() -> list[tuple[str, str | None, str]]:
    return [(m["lang"], m["mark"], m["body"]) for m in SNIPPET.finditer(README.read_text())]


def command_lines() -> list[str]:
    lines = []
    for lang, _, body in snippets():
        if lang == "bash":
            lines += [line.split("  #")[0].strip() for line in body.splitlines() if line.strip()]
    return lines


def not_run(line: str) -> str | None:
    return next((why for start, why in NOT_RUN.items() if line.startswith(start)), None)


def run_line(line: str) -> None:
    if line.startswith("printf "):
        text = shlex.split(line.split(">")[0])[1].encode().decode("unicode_escape")
        Path(line.split(">")[1].strip()).write_text(text)
        return
    argv = shlex.split(line)
    assert argv[0] == "invardiff", line
    assert main(argv[1:]) == 0, line


def test_every_snippet_is_run_or_classified():
    found = snippets()
    assert len(found) >= 8
    assert {mark for _, mark, _ in found} <= {None, "fragment"}
    assert sum(mark == "fragment" for _, mark, _ in found) == 1  # the hand-written loop: `...` placeholders
    for line in command_lines():
        assert not_run(line) or line.startswith(("invardiff ", "printf ")), line


def free_names(body: str) -> set[str]:
    """Names a snippet reads without defining them (imports, assignments, loop targets, functions, classes)."""
    import ast
    import builtins

    tree = ast.parse(body)
    defined = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            defined |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
    read = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    return read - defined


def test_snippets_that_import_are_self_contained():
    """A snippet with imports is meant to be copied on its own: everything it reads it imports or defines (the
    video snippet used `invardiff` without importing it, and passed only after the snippets before it). The
    snippets without imports continue the walkthrough (its `pipe` and `plan`)."""
    standalone = [body for lang, mark, body in snippets() if lang == "python" and mark is None and "import " in body]
    assert len(standalone) >= 4
    for body in standalone:
        assert not free_names(body), (free_names(body), body[:80])


def runnable() -> list[str]:
    return [line for line in command_lines() if not not_run(line)]


@pytest.mark.slow  # about 20 s of FLOP profiles, a memory simulation, a plot and a generation
def test_fast_command_lines_run_as_written(tmp_path, monkeypatch, capsys):
    """In README order, in a directory beside the repository's files (the README's paths are relative to its root),
    every command line that needs no demo or calibration output."""
    (tmp_path / "src").symlink_to(REPOSITORY / "src")
    monkeypatch.chdir(tmp_path)
    fast = [line for line in runnable() if not any(marker in line for marker in SLOW)]
    assert len(fast) >= 5
    for line in fast:
        run_line(line)


@pytest.mark.slow
def test_walkthrough_runs_as_written(tmp_path, monkeypatch, capsys):
    """`invardiff demo` as the README runs it, the Python snippets in order on the plan it wrote, then every command
    line that uses the demo's or the calibration's files."""
    (tmp_path / "src").symlink_to(REPOSITORY / "src")
    monkeypatch.chdir(tmp_path)
    assert main(["demo"]) == 0
    assert {p.name for p in (tmp_path / "out" / "demo").iterdir()} >= {
        "report.md",
        "report.json",
        "grid.png",
        "plan.json",
        "plan.rates.npz",
    }
    namespace: dict = {}
    for lang, mark, body in snippets():
        if lang == "python" and mark != "fragment":
            exec(compile(body, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    for line in runnable():  # in README order: the calibrations write what the lines after them read
        if not line.startswith("invardiff demo"):
            run_line(line)
