"""The suite's own cache: a test session uses a fresh cache under pytest's base temp folder (never
~/.cache/sat-cogvideo, nor a $SAT_COGVIDEO_DEMO / $SAT_COGVIDEO_CACHE of the caller), and what one test sets
(``demo_dir()`` exports ``SAT_COGVIDEO_DEMO``) the next test does not see.  Checked by running two small tests in
a pytest subprocess with this conftest.py and helpers.py."""
from __future__ import annotations

import os

from helpers import ROOT

INNER = '''
import os

from sat_cogvideo.demo import demo_dir


def test_a_cache_is_the_sessions(tmp_path_factory):
    base = str(tmp_path_factory.getbasetemp())
    assert os.environ["SAT_COGVIDEO_CACHE"] == os.path.join(base, "cache")
    assert os.environ["SAT_COGVIDEO_DEMO"] == os.path.join(base, "cache", "demo")
    os.environ.pop("SAT_COGVIDEO_DEMO")
    assert demo_dir() == os.path.join(base, "cache", "demo")  # the default, from SAT_COGVIDEO_CACHE
    os.environ["SAT_COGVIDEO_DEMO"] = "/elsewhere/demo"  # as demo_dir(folder) does
    os.environ["SAT_COGVIDEO_CACHE"] = "/elsewhere"


def test_b_sees_the_sessions_values(tmp_path_factory):
    base = str(tmp_path_factory.getbasetemp())
    assert os.environ["SAT_COGVIDEO_DEMO"] == os.path.join(base, "cache", "demo")
    assert os.environ["SAT_COGVIDEO_CACHE"] == os.path.join(base, "cache")
'''


def test_each_session_has_its_own_cache_and_tests_do_not_leak(pytester, monkeypatch):
    tests = os.path.join(ROOT, "tests")
    pytester.makeconftest(open(os.path.join(tests, "conftest.py"), encoding="utf-8").read())
    pytester.makepyfile(helpers=open(os.path.join(tests, "helpers.py"), encoding="utf-8").read(),
                        test_inner=INNER)
    home = pytester.path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SAT_COGVIDEO_DEMO", "/caller/demo")
    monkeypatch.setenv("SAT_COGVIDEO_CACHE", "/caller/cache")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly", "-q",
                                           "--basetemp", str(pytester.path / "bt"))
    result.assert_outcomes(passed=2)
    assert not (home / ".cache").exists()
