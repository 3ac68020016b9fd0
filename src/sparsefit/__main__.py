"""`python -m sparsefit ...`: the same CLI as the `sparsefit` command."""

from sparsefit.cli import main

main()
