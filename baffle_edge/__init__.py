"""baffle-edge: backpropagation-free federated learning (BAFFLE) on edge inference runtimes."""
__version__ = "0.1.0"
