"""``python -m ablate``: the ``ablate`` command, for launchers that start a module
(``torchrun --nproc_per_node 4 -m ablate run GRID``)."""
from .cli import main

main(prog_name="ablate")
