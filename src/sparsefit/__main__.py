"""`python -m sparsefit ...`: the same CLI as the `sparsefit` command, with its exit status."""

import sys

from sparsefit.cli import main

sys.exit(main())
