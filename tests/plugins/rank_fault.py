"""A distributed measurement that fails on one rank alone (tests/test_distributed.py):
ABLATE_RANK_FAULT=follower (default) raises on rank 1 before any collective; =leader
raises on rank 0 inside its leader-only section, after a collective of the work, as a
full disk does when rank 0 writes a checkpoint."""
import errno
import os

from ablate.collective import all_gather, leader_only, world
from ablate.measure import register_measure


@register_measure("rank_fault", distributed=True)
def rank_fault(cell, progress: bool = True) -> dict:
    """Fails on one rank of a torchrun launch; 1.0 elsewhere."""
    mode = os.environ.get("ABLATE_RANK_FAULT", "follower")
    if mode == "follower" and world().rank == 1:
        raise RuntimeError("injected on rank 1")
    all_gather(world().rank)
    with leader_only() as lead:
        if lead and mode == "leader":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return {"rank_fault_ok": 1.0}
