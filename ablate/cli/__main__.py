"""``python -m ablate.cli``: the ``ablate`` command (as ``ablate run --jobs`` starts its workers)."""
from . import main

main(prog_name="ablate")
