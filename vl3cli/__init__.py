"""vl3: caption and question images and videos with VideoLLaMA3, in plain PyTorch.

The package imports nothing heavy at top level: `vl3 --help` must stay fast.
"""

__version__ = "0.1.0"
