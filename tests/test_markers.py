"""The suite's own skipping rules: the gpu and inductor skips follow the markers, not pytest keywords (which also
hold every folder name of a test's path, so a checkout under a folder named ``gpu`` skipped every test)."""

import shutil
import subprocess
import sys
from pathlib import Path


def test_a_checkout_under_a_folder_named_gpu_runs_its_tests(tmp_path):
    suite = tmp_path / "gpu" / "inductor" / "tests"
    suite.mkdir(parents=True)
    shutil.copy(Path(__file__).with_name("conftest.py"), suite / "conftest.py")
    (suite / "test_plain.py").write_text("def test_plain():\n    assert 1 + 1 == 2\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout and "skipped" not in done.stdout
