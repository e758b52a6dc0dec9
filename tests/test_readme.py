"""README's CLI example runs from a fresh clone, command by command, exactly as written.

The block under `<!-- tested: tests/test_readme.py ... -->` is extracted from README.md and each
command is run for real with the installed `distillery` script, in a fresh folder holding only
the repository's configs/ (as a fresh clone's working directory does: relative paths in the
commands and in configs/tiny.yaml resolve there). Before: `distillery run STAGE|all --recipe
configs/tiny.yaml` stopped at once with "no teacher" (the tiny recipe names none).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "<!-- tested: tests/test_readme.py"


def readme_commands() -> list[list[str]]:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert MARK in text, "README.md lost its tested block marker"
    block = re.search(r"```bash\n(.*?)```", text[text.index(MARK):], re.DOTALL).group(1)
    commands = []
    for line in block.splitlines():
        line = line.split("  #", 1)[0].strip()  # "   # comment" at the end of a line
        if line:
            commands.append(shlex.split(line))
    return commands


def test_the_block_is_what_a_new_user_needs():
    commands = readme_commands()
    assert all(c[0] == "distillery" for c in commands)
    assert commands[0][1] == "tiny-model"          # the model comes first
    teacher = commands[0][2]
    assert any(c[1:3] == ["run", "generate"] and f"teacher={teacher}" in c for c in commands)


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """Every command of the block, in order, in a fresh working folder: [(argv, result)]."""
    work = tmp_path_factory.mktemp("fresh-clone")
    shutil.copytree(os.path.join(REPO, "configs"), work / "configs")
    exe = os.path.join(os.path.dirname(sys.executable), "distillery")
    env = {k: v for k, v in os.environ.items() if k not in ("DISTILLERY_DATA_ROOT", "RAY_ADDRESS")}
    results = []
    for argv in readme_commands():
        done = subprocess.run([exe] + argv[1:], cwd=work, env=env, capture_output=True,
                              text=True, timeout=600)
        results.append((argv, done))
        if done.returncode != 0:
            break
    return work, results


def test_every_command_runs(ran):
    work, results = ran
    for argv, done in results:
        assert done.returncode == 0, (argv, done.stdout[-2000:], done.stderr[-4000:])
        assert "Traceback" not in done.stderr, (argv, done.stderr[-4000:])
    assert len(results) == len(readme_commands())


def test_the_commands_did_what_they_say(ran):
    work, results = ran
    out = {" ".join(argv[1:3]): done.stdout for argv, done in results}
    data = work / "data" / "tiny"
    assert (data / "models" / "random" / "config.json").exists()
    for stage in ("prompts", "generate", "verify"):
        latest = (data / stage / "LATEST").read_text().strip()
        assert (data / stage / latest / ".manifest.json").exists()
    assert "verify@" in out["inspect verify"] and "verify_status" in out["inspect verify"]
    assert out["versions generate"].startswith("* ")
    assert "generate@" in out["lineage verify"] and "prompts@" in out["lineage verify"]
