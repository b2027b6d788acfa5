"""Shared pytest fixtures: repository paths, the shared real data (skipped when absent), the tools as modules."""
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def pytest_addoption(parser):
    parser.addoption("--all", action="store_true",
                     help="run the slow tier too (tests marked slow: real processes and full-size models)")


def pytest_collection_modifyitems(config, items):
    """The default run is the fast tier: tests marked ``slow`` are deselected unless ``--all`` is given, a
    ``-m`` expression chooses (``-m slow``: the slow tier alone), or the test is named by its node id."""
    if config.getoption("--all") or config.getoption("markexpr"):
        return
    named = {arg for arg in config.args if "::" in arg}
    fast, slow = [], []
    for item in items:
        is_named = any(item.nodeid == arg or item.nodeid.startswith((arg + "[", arg + "::")) for arg in named)
        (slow if item.get_closest_marker("slow") and not is_named else fast).append(item)
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = fast


def pytest_report_header(config):
    if not (config.getoption("--all") or config.getoption("markexpr")):
        return "fast tier: tests marked slow are left out; --all runs the whole suite, -m slow the slow tier"


@pytest.fixture
def one_thread():
    """In-process runs use one thread, like the tools' subprocesses under test (OMP_NUM_THREADS=1):
    on a busy 2-core machine two OpenMP threads per process are several times slower, not faster."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def train_tool():
    """tool/train.py as a module (``train_tool.main(argv)`` runs it in-process)."""
    from tiny_runs import load_script

    return load_script("tool/train.py", "train_tool_under_test")


@pytest.fixture(scope="session")
def test_tool():
    """tool/test.py as a module (``test_tool.main(argv)`` runs it in-process)."""
    from tiny_runs import load_script

    return load_script("tool/test.py", "test_tool_under_test")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """../shared/reference: the release's state-dict layouts and BEHAVIOUR.md."""
    path = SHARED / "reference"
    if not (path / "state_dict_keys.json").is_file():
        pytest.skip(f"release reference files not found at {path}")
    return path


@pytest.fixture(scope="session")
def camvid_root() -> Path:
    """../shared/data/camvid: real CamVid images (11 classes); CI has it, a lone clone may not."""
    path = SHARED / "data" / "camvid"
    if not (path / "train.txt").is_file():
        pytest.skip(f"CamVid not found at {path}")
    return path
