"""Set-up that must run inside each of vLLM's worker processes, where the model executes.

vllm_app names `vllm_app_worker.WorkerSetup` as vLLM's `worker_extension_cls`, so vLLM imports this
module in every worker process before it loads the model. Importing it is the set-up: the module
stays tiny (no Ray, no pydantic) because every worker pays for its imports.

Why: on Intel CPUs with AMX, Linux lets a process use the AMX tile registers only after it asks
(arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA); a process that executes a tile instruction
without that permission gets SIGILL. The permission is per process and an exec resets it, so
vLLM's spawned worker starts without it. vLLM's CPU attention picks its AMX kernel whenever the
CPU has AMX tiles (vllm/v1/attention/backends/cpu_attn.py, _get_attn_isa) and never asks; oneDNN
asks by itself, but only once a matrix product is large enough for its AMX kernels. So a worker
whose first prompt is a few tokens long runs AMX attention before any oneDNN call asked, and dies
with SIGILL (exit -4); a long first prompt makes oneDNN ask first, and all later prompts work.
Seen under gdb on an Intel Xeon with AMX: the fault is `tilezero %tmm6` in the AMX attention kernel
(vLLM's csrc/cpu/cpu_attn_amx.hpp) on a 2-token first prefill, and asking first makes it pass.
Asking here, before the model runs, removes that ordering. On CPUs without AMX, or GPUs' hosts
without it, the kernel refuses and nothing changes.
"""

import ctypes
import errno
import logging
import os

logger = logging.getLogger("vllm_app_worker")

# From Linux's arch/x86/include/uapi/asm/prctl.h and the x86 xstate feature numbers.
SYS_ARCH_PRCTL = 158  # x86-64 syscall number
ARCH_GET_XCOMP_PERM = 0x1022
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18


def amx_tile_permission() -> str:
    """Ask Linux for AMX tile data in this process. Returns what happened, for the log:
    "granted", "not on this CPU" (or not x86-64 Linux), or the kernel's refusal."""
    if os.uname().machine != "x86_64" or os.uname().sysname != "Linux":
        return "not on this CPU"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0:
        code = ctypes.get_errno()
        # EOPNOTSUPP, EINVAL, ENODEV: the CPU (or a kernel older than 5.16) has no AMX state to grant.
        return "not on this CPU" if code in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENODEV) else f"refused: {os.strerror(code)}"
    permitted = ctypes.c_uint64(0)
    libc.syscall(SYS_ARCH_PRCTL, ARCH_GET_XCOMP_PERM, ctypes.byref(permitted))
    return "granted" if permitted.value & (1 << XFEATURE_XTILEDATA) else "refused: not in the permitted set"


AMX_TILES = amx_tile_permission()
if AMX_TILES.startswith("refused"):
    logger.warning("AMX tile permission %s in vLLM worker %d; if the engine then dies with SIGILL, see the "
                   "README's Troubleshooting", AMX_TILES, os.getpid())


class WorkerSetup:
    """vLLM mixes this class into its worker class. It adds nothing: the module import above is
    what the worker needs."""
