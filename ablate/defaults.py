"""Defaults and file names that several modules share (a command-line option and the code
behind it, a file one layer writes and another reads), each written here once.

A light module (no torch): the CLI reads it when it builds its options, the report when it
looks for sample grids.
"""

WAIT_S = 300  # seconds: how long a runner waits for a measurement another process holds (`ablate run --wait`)
SLURM_TIMEOUT_MIN = 60  # minutes: a SLURM task's time limit (`ablate run --launcher submitit --timeout`)
SLURM_POLL_S = 1.0  # seconds: how often the submitting process reads the store for the tasks' progress

# The grid of EMA samples that training saves at each evaluation, in its work folder; the step
# zero-padded so that the names sort by step.
SAMPLE_GRID = "samples_step{step:07d}.png"
SAMPLE_GRIDS = "samples_step*.png"  # every one of them, as a glob
