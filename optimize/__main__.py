"""`python -m optimize` runs the CLI."""

from optimize.cli import main

main()
