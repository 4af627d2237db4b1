"""Benchmark provenance shared by every benchmark's rows (the timings themselves run on the GPU machine)."""

import subprocess
from pathlib import Path

from hf_fp8cache.benchmark import git_revision


def test_rows_name_the_code_they_measured():
    # HEAD's sha, marked when tracked files differ from it; "unknown" outside a checkout
    repo = Path(__file__).parent
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
    if head.returncode != 0:
        assert git_revision() == "unknown"
        return
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True,
                            text=True, check=True).stdout  # fmt: skip
    assert git_revision() == head.stdout.strip() + ("+dirty" if status.strip() else "")
