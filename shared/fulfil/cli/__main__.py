"""`python -m fulfil.cli` is the `fulfil` command."""

from fulfil.cli import main

main()
