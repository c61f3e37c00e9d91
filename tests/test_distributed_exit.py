"""A gloo process group is destroyed at interpreter exit (Lightning destroys only NCCL ones): without it, CPU DDP
ranks can abort in C++ static destruction after training has finished."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gloo_group_is_destroyed_at_exit() -> None:
    script = textwrap.dedent(f"""
        import atexit
        import torch.distributed as dist
        # registered first, so it runs last: after lightning_adamw's handler
        atexit.register(lambda: print("initialized at exit:", dist.is_initialized(), flush=True))
        import lightning_adamw  # noqa: F401
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        print("initialized:", dist.is_initialized(), flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["initialized:", "True", "initialized", "at", "exit:", "False"]
