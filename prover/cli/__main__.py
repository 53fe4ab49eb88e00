"""`python -m prover.cli`, e.g. under `accelerate launch -m prover.cli train ...`."""

from prover.cli import main

main()
