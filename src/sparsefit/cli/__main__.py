import sys

from sparsefit.cli.main import main

sys.exit(main())
