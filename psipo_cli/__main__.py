"""`python -m psipo_cli` and `accelerate launch -m psipo_cli` entry point."""

from psipo_cli.cli import main

main()
