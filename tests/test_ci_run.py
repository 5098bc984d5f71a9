"""``.ci/run``: the CI entry point installs SLURM when it can, runs the whole suite with the slow tests, and says in
its last line when the run is not a full one (SLURM missing).  Run in a copy of the repository layout with fake
``test.sh``, ``scripts/slurm_local.sh`` and ``id`` (nothing is installed, no test suite runs)."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest

from helpers import ROOT


def executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def ci(tmp_path):
    (tmp_path / ".ci").mkdir()
    shutil.copy(os.path.join(ROOT, ".ci", "run"), tmp_path / ".ci" / "run")
    (tmp_path / "scripts").mkdir()
    executable(tmp_path / "test.sh", '#!/usr/bin/env bash\nprintf "test.sh:"; printf " [%s]" "$@"; echo\n'
                                     'echo "REQUIRE_SLURM=${SAT_COGVIDEO_REQUIRE_SLURM:-}"\nexit "${FAKE_TESTS_RC:-0}"\n')
    executable(tmp_path / "scripts" / "slurm_local.sh",
               '#!/usr/bin/env bash\necho "slurm_local.sh $*"\nexit "${FAKE_INSTALL_RC:-0}"\n')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "id", '#!/usr/bin/env bash\necho "${FAKE_UID:-0}"\n')

    def run(**env):
        full = {k: v for k, v in os.environ.items() if k != "SAT_COGVIDEO_REQUIRE_SLURM"}
        full.update(PATH=f"{bin_dir}:{os.environ['PATH']}", **{k: str(v) for k, v in env.items()})
        r = subprocess.run(["bash", str(tmp_path / ".ci" / "run"), "-x"], cwd=str(tmp_path), env=full,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
        return r.returncode, r.stdout.strip().splitlines()

    return run


def test_slurm_installed_full_run_with_slow_tests(ci):
    rc, lines = ci(FAKE_INSTALL_RC=0, FAKE_TESTS_RC=0)
    assert rc == 0
    assert "slurm_local.sh install" in lines
    assert "test.sh: [-m] [slow or not slow] [-x]" in lines  # the slow tests run; arguments pass through
    assert lines[-1] == "REQUIRE_SLURM=1"  # the real-SLURM tests must run; no warning after the tests


@pytest.mark.parametrize("env,why", [({"FAKE_INSTALL_RC": 1}, "SLURM could not be installed"),
                                     ({"FAKE_UID": 1000}, "SLURM is installed only as root")])
def test_without_slurm_the_last_line_says_it(ci, env, why):
    rc, lines = ci(FAKE_TESTS_RC=3, **env)
    assert rc == 3  # the suite's exit status
    assert "test.sh: [-m] [slow or not slow] [-x]" in lines and "REQUIRE_SLURM=" in lines
    assert lines[-1].startswith("warning: NOT A FULL RUN: " + why), lines
    assert "real-SLURM tests" in lines[-1]
