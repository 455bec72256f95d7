"""strata: benchmarks.

Importing `train` re-executes a `python -m benchmarks...` command with huge
pages on CPU-only hosts, as it does `python -m train...` (train/host_memory.py).
"""

import train  # noqa: F401  (for that side effect)
