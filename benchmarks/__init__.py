"""strata: benchmarks.

`python -m benchmarks...` re-executes itself with huge pages on CPU-only hosts,
as `python -m train...` does (train/host_memory.py).
"""

from train import host_memory

host_memory.reexec_with_huge_pages()
