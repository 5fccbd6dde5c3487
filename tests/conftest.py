import os
import sys
from pathlib import Path

import pytest
import torch

# Tiny tensors run faster on one thread than on two that contend with the test runner.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "ablate" / "reference"  # the paper's Table 4, shipped with the package


def run_cli(*args, cwd=None, env=None, timeout=300):
    """Run the `ablate` CLI in a fresh process, as a user would."""
    import subprocess

    e = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ablate.cli", *map(str, args)], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli
