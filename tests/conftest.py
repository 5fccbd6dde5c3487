import csv
import os
import sys
from pathlib import Path

import pytest
import torch

from ablate.models import DiT

# Tiny tensors run faster on one thread than on two that contend with the test runner.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def cache(tmp_path_factory):
    """One cache root for the session (``ABLATE_CACHE``, inherited by the CLI processes the
    tests start), with the compile cache in it: no test reads or writes the user's
    ~/.cache/ablate, and what a test makes there (the domain extractor of digits, trained in
    about 15 s on 2 cores; reference statistics; compiled kernels) is made once per session."""
    path = tmp_path_factory.mktemp("ablate-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("ABLATE_CACHE", str(path))
    for name in ("ABLATE_COMPILE_CACHE", "TORCHINDUCTOR_CACHE_DIR"):
        mp.delenv(name, raising=False)  # compile_cache() then puts the kernels under the root
    yield path
    mp.undo()
REFERENCE = REPO / "ablate" / "reference"  # the paper's Table 4, shipped with the package


def run_cli(*args, cwd=None, env=None, timeout=300):
    """Run the `ablate` CLI in a fresh process, as a user would."""
    import subprocess

    e = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ablate.cli", *map(str, args)], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=timeout)


def table4() -> list[dict]:
    """The rows of the paper's Table 4 (model, gflops, params_m)."""
    with open(REFERENCE / "dit_table4_256.csv") as f:
        return list(csv.DictReader(f))


def tiny(block: str = "adaln-zero", *, seed: int = 0, input_size: int = 8, patch_size: int = 2,
         in_channels: int = 4, hidden_size: int = 64, depth: int = 2, num_heads: int = 4,
         num_classes: int = 10, live_output: bool = False, **kw) -> DiT:
    """A tiny DiT (2 blocks, 64 wide by default), seeded."""
    torch.manual_seed(seed)
    model = DiT(input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
                depth=depth, num_heads=num_heads, num_classes=num_classes, block=block, **kw)
    if live_output:  # the zero-initialised output layer would make every sample identical
        with torch.no_grad():
            for p in model.final_layer.parameters():
                p.normal_(0, 0.02)
    return model


PROBE = Path(__file__).resolve().parent / "plugins" / "probe.py"


def probe_grid(tmp_path, axes: str, probe: str = "{}", extra: str = "") -> Path:
    """A grid of the probe plugin's measurement (tests/plugins/probe.py) over ``axes``."""
    import textwrap

    p = tmp_path / "grid.yaml"
    p.write_text(textwrap.dedent(f"""
        name: probe-grid
        imports: [{PROBE}]
        grid: {axes}
        base:
          model: DiT-T/4
          data: {{name: digits, image_size: 16}}
          measure: [probe]
          probe: {probe}
        """) + extra)
    return p


def checkpoint_step(results: Path) -> int:
    """The step of the training checkpoint in a results folder (0 while there is none or it
    is being replaced): what a test waits for before it kills a run."""
    for p in (results / "work").glob("train-*/checkpoint.pt") if (results / "work").exists() else []:
        try:
            return torch.load(p, weights_only=False)["step"]
        except (OSError, RuntimeError, EOFError):
            return 0
    return 0
