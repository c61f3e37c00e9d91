"""Destroy a gloo process group at interpreter exit, as Lightning does for NCCL.

Lightning 2.x registers ``torch.distributed.destroy_process_group`` at exit only when the backend is NCCL. A gloo
group (DDP on CPUs, ``ddp`` or ``ddp_spawn``) is left to the C++ static destructors. Its transport threads are still
running then, so a rank can die after training has finished, with "terminate called without an active exception"
(SIGABRT). ``ddp_spawn`` then raises ``ProcessExitedException`` in the main process, and the run is reported as
failed (now and then, not every time). Destroying the group first, from an ``atexit`` handler, stops those threads in
order. The handler does nothing unless a gloo group is still initialized.
"""

from __future__ import annotations

import atexit

import torch


def destroy_gloo_group() -> None:
    """``torch.distributed.destroy_process_group()`` when a gloo process group is still initialized."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
        dist.destroy_process_group()


atexit.register(destroy_gloo_group)
