"""`python -m moetrim.cli ...` runs the CLI, as `python -m moetrim ...` does."""

from moetrim.cli import main

main()
