"""A measurement for tests: logs when it starts and finishes, can sleep, fail or give NaN."""
import os
import time
from dataclasses import dataclass

from ablate.measure import MODEL_KEYS, register_measure


@dataclass
class ProbeSettings:
    sleep_s: float = 0.0
    fail: bool = False
    nan: bool = False


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
    if s.fail:
        raise RuntimeError("probe failed on purpose")
    _log(f"done {cell.id} {os.getpid()}")
    return {"probe_value": float("nan") if s.nan else float(cell.config["seed"]), "probe_list": [1, 2]}
