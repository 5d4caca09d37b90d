"""Every ```python block of README.md runs as written, each in a fresh interpreter.

The blocks pick their device themselves (CUDA when visible, else the CPU).
Each runs in its own subprocess, with a timeout, from a temporary directory (also its TMPDIR),
with the repository on PYTHONPATH (for an in-place build). The bash blocks
are checked for what can be checked without running them: the scripts and
options they name exist, and no command writes over a committed results file.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
TIMEOUT_S = 300


def blocks(lang: str) -> list[tuple[int, str]]:
    """(line number, code) of each fenced block in ``lang``."""
    text = README.read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(2)) for m in BLOCK.finditer(text) if m.group(1) == lang]


PYTHON_BLOCKS = blocks("python")


def test_readme_has_python_blocks() -> None:
    assert len(PYTHON_BLOCKS) >= 5


@pytest.mark.parametrize("line,code", PYTHON_BLOCKS, ids=[f"line{n}" for n, _ in PYTHON_BLOCKS])
def test_python_block_runs(line: int, code: str, tmp_path: Path) -> None:
    if "import onnxruntime" in code:
        pytest.importorskip("onnxruntime")  # the block needs the [onnx] extra
    script = tmp_path / "block.py"
    script.write_text(code)
    # TMPDIR: what a block saves with tempfile (a 92 MB checkpoint, an ONNX
    # file) goes under pytest's tmp_path, which pytest prunes, not into /tmp.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"README.md block at line {line} failed:\n{code}\n--- stderr ---\n{proc.stderr[-3000:]}"


def bash_commands() -> list[list[str]]:
    cmds = []
    for _, code in blocks("bash"):
        code = code.replace("\\\n", " ")  # join continued lines
        for raw in code.splitlines():
            line = raw.split("#", 1)[0].strip()
            if line:
                cmds.append(shlex.split(line))
    return cmds


def test_bash_blocks_name_real_scripts_and_options() -> None:
    usage: dict[str, str] = {}
    checked = 0
    for cmd in bash_commands():
        if cmd[0] != "python" or len(cmd) < 2 or not cmd[1].startswith("benchmarks/"):
            continue
        script = REPO / cmd[1]
        assert script.exists(), cmd
        if cmd[1] not in usage:
            proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                                  cwd=REPO, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
            assert proc.returncode == 0, proc.stderr
            usage[cmd[1]] = proc.stdout
        for opt in (c for c in cmd[2:] if c.startswith("--")):
            assert opt in usage[cmd[1]], f"{cmd[1]} has no option {opt}"
        checked += 1
    assert checked >= 4


def test_bash_blocks_do_not_overwrite_committed_results() -> None:
    committed = {p.resolve() for p in (REPO / "benchmarks" / "results").iterdir()}
    for cmd in bash_commands():
        for flag in ("--json", "--plot"):
            if flag in cmd:
                target = (REPO / cmd[cmd.index(flag) + 1]).resolve()
                assert target not in committed, f"README command writes over {target}: {' '.join(cmd)}"
                assert REPO / "benchmarks" / "results" not in target.parents, cmd


def test_make_targets_exist() -> None:
    makefile = (REPO / "Makefile").read_text()
    for cmd in bash_commands():
        if cmd[0] == "make":
            for target in cmd[1:]:
                assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"no make target {target}"
