"""`python -m sparsefit.runtime [-v]`: build the sparse kernels now (the set-up script does), not on first use."""

import sys

from sparsefit.runtime.kernels import build_dir, load_kernels

k = load_kernels(verbose="-v" in sys.argv)
print(f"sparse kernels: {k.isa} in {build_dir()}" if k.available else f"sparse kernels unavailable: {k.reason}")
