"""A distributed measurement that fails on rank 1 alone (tests/test_distributed.py)."""
from ablate.distributed import world
from ablate.measure import register_measure


@register_measure("rank_fault", distributed=True)
def rank_fault(cell, progress: bool = True) -> dict:
    """Fails on rank 1 of a torchrun launch; 1.0 elsewhere."""
    if world().rank == 1:
        raise RuntimeError("injected on rank 1")
    return {"rank_fault_ok": 1.0}
