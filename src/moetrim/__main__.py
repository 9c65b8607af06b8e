"""`python -m moetrim ...` (and `accelerate launch -m moetrim ...`, `torchrun -m moetrim ...`) run the CLI."""

from moetrim.cli import main

main()
