"""The README's code blocks run: Python blocks are executed as written (in a temporary folder) and the shapes their
comments promise are checked; shell lines are run where cheap (--help, --version) and otherwise parsed by the CLI's
own parser, so that a renamed command or flag fails here. Local links of the README and the docs must resolve."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tokenbridge.cli_parser import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
# `name = ...  # ... [3, 1, 32, 32] ...`: the first all-integer shape in an assignment's comment
SHAPE_COMMENT = re.compile(r"^(\w+)(?:, \w+)* = .*#[^\[]*?\[(\d+(?:, \d+)*)\]")


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(README.read_text()) if lang == language]


def shell_commands() -> list[list[str]]:
    """Every command of the README's bash blocks as argv lists (continuations joined, comments and `&&` split)."""
    commands = []
    for body in blocks("bash"):
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                commands.append(words[:cut])
                words = words[cut + 1:]
    return commands


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([\w-]+):", text, flags=re.M))


def test_the_readme_has_code_blocks_of_both_kinds_and_no_others():
    languages = {lang for lang, _ in BLOCK.findall(README.read_text())}
    # the layout tree is the one block without a language; anything else would go untested
    assert languages <= {"python", "bash", ""}, languages
    assert len(blocks("python")) >= 3 and len(blocks("bash")) >= 5


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs_and_its_shape_comments_hold(index, tmp_path, monkeypatch):
    source = blocks("python")[index]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"readme_block_{index}"}
    exec(compile(source, f"README.md python block {index}", "exec"), namespace)
    checked = 0
    for line in source.splitlines():
        match = SHAPE_COMMENT.match(line)
        if match and hasattr(namespace.get(match.group(1)), "shape"):
            expected = [int(n) for n in match.group(2).split(", ")]
            assert list(namespace[match.group(1)].shape) == expected, line
            checked += 1
    # every path under out/ that a block names is written by it
    for written in re.findall(r'"(out/[\w./-]+)"', source):
        assert (tmp_path / written).exists(), written
    assert checked or "out/" in source or "print(" in source, "a block with nothing checkable"


def test_help_and_version_run_and_list_the_commands_of_the_readme():
    commands = shell_commands()
    assert ["tokenbridge", "--help"] in commands and ["tokenbridge", "--version"] in commands
    run = dict(cwd=ROOT, capture_output=True, text=True, timeout=60)
    help_text = subprocess.run([sys.executable, "-m", "tokenbridge", "--help"], **run)
    assert help_text.returncode == 0, help_text.stderr
    listed = set(re.findall(r"^    ([a-z][\w-]+)", help_text.stdout, flags=re.M))
    documented = set(re.findall(r"^\| `([a-z][\w-]+)`", README.read_text(), flags=re.M))
    documented |= set(re.findall(r", `([a-z][\w-]+)`", "\n".join(
        line for line in README.read_text().splitlines() if line.startswith("| `train-vq`"))))
    assert listed and listed <= documented, f"commands missing from the README's table: {listed - documented}"
    version = subprocess.run([sys.executable, "-m", "tokenbridge", "--version"], **run)
    project = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), flags=re.M).group(1)
    assert version.returncode == 0 and version.stdout.strip() == f"tokenbridge {project}"


def test_every_shell_line_parses():
    parser = build_parser()
    targets = make_targets()
    for argv in shell_commands():
        if argv[0] == "make":
            assert set(argv[1:]) <= targets, f"{argv}: not a Makefile target"
            continue
        if argv[0] == "torchrun":
            assert "tokenbridge.cli" in argv, argv
            argv = ["tokenbridge", *argv[argv.index("tokenbridge.cli") + 1:]]
        assert argv[0] == "tokenbridge", f"a shell line this test does not know how to check: {argv}"
        if argv[1:] in (["--help"], ["--version"]):
            continue  # run for real above
        try:
            args = parser.parse_args(argv[1:])
        except SystemExit as exit_:
            pytest.fail(f"{shlex.join(argv)} does not parse (exit {exit_.code})")
        assert args.command == argv[1]


@pytest.mark.parametrize("page", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))])
def test_local_links_resolve(page):
    path = ROOT / page
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (path.parent / target.split("#")[0]).exists():
            missing.append(target)
    assert not missing, f"{page}: links to missing files {missing}"


def test_the_readmes_anchors_name_its_headings():
    text = README.read_text()
    # GitHub's anchor of a heading: lower case, punctuation other than hyphens dropped, spaces as hyphens
    slugs = {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
             for heading in re.findall(r"^#+ (.+)$", text, flags=re.M)}
    anchors = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert anchors and anchors <= slugs, f"anchors without a heading: {anchors - slugs}"
