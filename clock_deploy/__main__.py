"""`python -m clock_deploy ...` (also what `torchrun -m clock_deploy train ...` runs on every rank)."""
from clock_deploy.cli import main

main()
