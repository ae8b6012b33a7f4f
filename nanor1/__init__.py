"""nanor1: the DeepSeek-R1 recipe end to end, in one small, hackable PyTorch codebase."""

__version__ = "0.1.0"

