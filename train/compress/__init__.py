"""Compression: pruning, quantization (RTN / AWQ-style), calibration, the evaluation gate and the
measured optimization table. ``python -m train.compress -c configs/compress/small.yaml``."""
