"""Measurements for tests: ``probe`` logs when it starts and finishes, can sleep, wait for a
file, fail or give NaN; ``probe_after`` needs it."""
import os
import time
from dataclasses import dataclass

from ablate.measure import MODEL_KEYS, register_measure


@dataclass
class ProbeSettings:
    sleep_s: float = 0.0
    fail: bool = False
    nan: bool = False
    wait_for: str = ""  # hold the measurement until this file exists (at most a minute)


def _log(line: str) -> None:
    path = os.environ.get("ABLATE_PROBE_LOG")
    if path:
        with open(path, "a") as f:  # O_APPEND: whole lines from concurrent processes
            f.write(line + "\n")


@register_measure("probe", settings=ProbeSettings, uses=MODEL_KEYS + ("seed",))
def probe(cell, progress: bool = True) -> dict:
    """Test probe."""
    s = cell.settings("probe")
    _log(f"start {cell.id} {os.getpid()}")
    time.sleep(s.sleep_s)
    deadline = time.time() + 60
    while s.wait_for and not os.path.exists(s.wait_for) and time.time() < deadline:
        time.sleep(0.05)
    if s.fail:
        raise RuntimeError("probe failed on purpose")
    _log(f"done {cell.id} {os.getpid()}")
    return {"probe_value": float("nan") if s.nan else float(cell.config["seed"]), "probe_list": [1, 2]}


@register_measure("probe_after", uses=MODEL_KEYS + ("seed",), needs=("probe",))
def probe_after(cell) -> dict:
    """Test probe that needs probe."""
    _log(f"after {cell.id} {os.getpid()}")
    return {"probe_after_value": cell.needed["probe"].metrics["probe_value"] + 1}
