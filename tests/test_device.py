"""Device set-up that a CPU user relies on without knowing it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import ctypes, sys
    import torch
    from cnnreg.core.device import configure_backends

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    if sys.argv[1] == "cpu-run":
        configure_backends(torch.device("cpu"), deterministic=False, cudnn_benchmark=True)
    for _ in range(3):  # an activation-sized tensor, made and freed as a training step does
        x = torch.ones(64, 32, 112, 112)
        del x
    info = libc.mallinfo2()
    print(info.hblkhd, info.fordblks)  # bytes in mmapped blocks now, bytes free in the heap for reuse
""")


def _memory_after_freeing(mode: str) -> tuple[int, int]:
    done = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    mapped, free = map(int, done.stdout.split())
    return mapped, free


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_cpu_run_keeps_freed_activations_for_the_next_step():
    size = 64 * 32 * 112 * 112 * 4  # 103 MB, above glibc's largest mmap threshold
    _, free_by_default = _memory_after_freeing("plain")
    assert free_by_default < size  # positive control: by default glibc gives such a block back to the kernel
    _, free_in_a_run = _memory_after_freeing("cpu-run")
    assert free_in_a_run >= size  # kept in the heap: the next step reuses it without faulting pages in
