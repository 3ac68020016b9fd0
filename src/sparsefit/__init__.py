"""sparsefit: prune a dense causal language model, recover its accuracy, export it."""

__version__ = "0.1.0"
