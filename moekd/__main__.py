"""`python -m moekd` is the `moekd` command."""

from moekd.cli import main

main()
