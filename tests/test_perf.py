"""util/runtime/perf.py: the process-wide allocator setting of the tools."""
import os
import subprocess
import sys

import pytest


@pytest.mark.slow  # two Python processes importing torch
def test_keep_freed_memory_for_reuse_in_a_subprocess(repo_root):
    code = ("from util.runtime.perf import keep_freed_memory_for_reuse as k; import torch; k(); "
            "x = torch.ones(1 << 24); print(k())")
    env = dict(os.environ)
    done = subprocess.run([sys.executable, "-c", code], cwd=repo_root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    if sys.platform.startswith("linux"):
        assert done.stdout.strip() == "True"
    env["PYCONV_DEFAULT_MALLOC"] = "1"
    done = subprocess.run([sys.executable, "-c", code], cwd=repo_root, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "False"
