"""strata: train.

`python -m train...` commands on CPU-only Linux hosts re-execute themselves
once with glibc's huge-page tunable (train/host_memory.py: XLA:CPU's per-step
scratch buffer stops costing ~430k page faults a step); STRATA_HUGE_PAGES=0
turns that off.
"""

from train import host_memory

host_memory.reexec_with_huge_pages()
