"""The two tiers of the suite (tests/conftest.py, pytest.ini): which tests a run selects."""
import pytest

from conftest import REPO_ROOT

pytest_plugins = ["pytester"]

EXAMPLE = """
import pytest


def test_fast():
    pass


@pytest.mark.slow
def test_slow():
    pass
"""


@pytest.fixture
def suite(pytester):
    """A folder with the repository's conftest.py and pytest.ini, and one fast and one slow test."""
    pytester.makeconftest((REPO_ROOT / "tests" / "conftest.py").read_text())
    pytester.makeini((REPO_ROOT / "pytest.ini").read_text())
    pytester.makepyfile(test_example=EXAMPLE)
    return pytester


@pytest.mark.parametrize("args, passed, deselected", [
    ((), ["test_fast"], 1),  # the default run: the fast tier
    (("--all",), ["test_fast", "test_slow"], 0),  # the whole suite
    (("-m", "slow"), ["test_slow"], 1),  # the slow tier alone
    (("test_example.py::test_slow",), ["test_slow"], 0),  # a slow test named by its node id runs
])
def test_tier_selection(suite, args, passed, deselected):
    result = suite.runpytest_subprocess("-v", "-p", "no:cacheprovider", *args)
    assert result.ret == 0, result.stdout.str()
    ran = sorted(line.split("::")[1].split()[0] for line in result.outlines if " PASSED" in line)
    assert ran == passed
    assert result.parseoutcomes().get("deselected", 0) == deselected


def test_a_misspelled_marker_is_an_error(suite):
    suite.makepyfile(test_typo="import pytest\n\n\n@pytest.mark.slwo\ndef test_typo():\n    pass\n")
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "test_typo.py")
    assert result.ret != 0 and "'slwo' not found in `markers` configuration option" in result.stdout.str()
