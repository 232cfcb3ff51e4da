"""No shell anywhere in the process handling: every program ferry runs is an argument list.

A shell would turn a guest name, a path or a compressor option into code; this
reads the source of workers/, tasks/, scripts/ and config/ and fails on any way
of reaching one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.unit.test_import_graph import parse_python

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("workers", "tasks", "scripts", "config")
SHELL_CALLS = {"os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput",
               "asyncio.create_subprocess_shell", "create_subprocess_shell", "getoutput",
               "getstatusoutput", "pty.spawn"}
SHELLS = {"sh", "bash", "dash", "zsh", "/bin/sh", "/bin/bash", "/usr/bin/sh", "/usr/bin/bash"}


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return ""


def _shell_argv(node: ast.expr) -> bool:
    """A literal argv that runs a shell with a command string: ["sh", "-c", ...]."""
    if not isinstance(node, ast.List | ast.Tuple) or not node.elts:
        return False
    words = [e.value for e in node.elts if isinstance(e, ast.Constant)]
    return bool(words) and words[0] in SHELLS and "-c" in words


def shell_uses(source: str, filename: str = "<src>") -> list[str]:
    """Every place in `source` that runs a shell, as 'file:line what'."""
    found = []
    for node in ast.walk(parse_python(source, filename)):
        if isinstance(node, ast.Call):
            name = _name(node.func)
            if name in SHELL_CALLS:
                found.append(f"{filename}:{node.lineno} {name}()")
            for kw in node.keywords:
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant)
                                              and kw.value.value is False):
                    found.append(f"{filename}:{node.lineno} shell=...")
        if isinstance(node, ast.List | ast.Tuple) and _shell_argv(node):
            found.append(f"{filename}:{node.lineno} shell argv")
    return found


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("snippet", [
    "import subprocess\nsubprocess.run('ls', shell=True)",
    "import subprocess\nsubprocess.Popen(cmd, shell=flag)",
    "import os\nos.system('ls')",
    "import os\nos.popen('ls').read()",
    "import asyncio\nasyncio.create_subprocess_shell('ls')",
    "import subprocess\nsubprocess.getoutput('ls')",
    "import subprocess\nsubprocess.run(['sh', '-c', 'gzip -c > x'])",
    "import subprocess\nsubprocess.run(('/bin/bash', '-c', cmd))",
])
def test_the_detector_finds_each_way_of_running_a_shell(snippet: str) -> None:
    assert shell_uses(snippet)


def test_an_argument_list_and_shell_false_are_not_a_shell() -> None:
    assert shell_uses("import subprocess\nsubprocess.run(['gzip', '-c'], shell=False)\n"
                      "x = ['sh', 'not-a-flag']") == []


def test_no_module_of_ferry_runs_a_shell() -> None:
    sources = _sources()
    assert len(sources) > 40  # the packages were found
    found = [hit for path in sources
             for hit in shell_uses(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == []
