"""The README's 3D quick start runs as written: the code blocks after `<!-- quickstart -->` are executed
(Python with exec, bash with the venv's `genfast` first on PATH) in an empty folder, offline.

The one change: `--steps 300` becomes `--steps 2 --invert-steps 2`, as the README says, so the test takes
seconds instead of minutes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
MARK = re.compile(r"<!-- quickstart -->\s*\n```(\w+)\n(.*?)\n```", re.DOTALL)
FEWER_STEPS = ("--steps 300", "--steps 2 --invert-steps 2")


def quickstart_blocks() -> list[tuple[str, str]]:
    return MARK.findall(README.read_text())


def test_the_readme_marks_a_python_and_a_bash_quick_start():
    blocks = quickstart_blocks()
    assert [lang for lang, _ in blocks] == ["python", "bash"]
    assert sum(code.count(FEWER_STEPS[0]) for _, code in blocks) == 1  # the substitution the README announces
    assert "`--steps 300` becomes `--steps 2 --invert-steps 2`" in README.read_text()


def test_the_quick_start_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (_, python), (_, script) = quickstart_blocks()
    exec(compile(python, "README.md quickstart", "exec"), {"__name__": "__quickstart__"})  # noqa: S102 -- the README's own code
    assert "torch.Size([2, 3, 64, 64])" in capsys.readouterr().out
    assert (tmp_path / "orbit.gif").is_file()

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(["bash", "-e", "-c", script.replace(*FEWER_STEPS)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "me").iterdir()) == [f"{i:02d}.png" for i in range(10)] + [
        "dataset.json"]
    assert (tmp_path / "me.adapter" / "personalize.json").is_file() and not (tmp_path / "me.adapter.work").exists()
    assert (tmp_path / "me.gif").is_file() and (tmp_path / "between" / "interpolation.png").is_file()
    assert "wrote me.adapter: 10 photos" in done.stdout


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
