"""Where to run: CPU threads and GPU offload."""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Literal

from edge_adapt.errors import UsageError

Device = Literal["auto", "cpu", "cuda", "metal"]


def physical_cores() -> int:
    """Physical cores this process may run on. llama.cpp collapses when threads outnumber cores."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if platform.system() == "Linux":
        try:
            cores: set[tuple[str, str]] = set()
            cpu = phys = core = None
            with open("/proc/cpuinfo") as fh:
                for line in list(fh) + [""]:
                    key, _, val = line.partition(":")
                    key, val = key.strip(), val.strip()
                    if key == "processor":
                        cpu = int(val)
                    elif key == "physical id":
                        phys = val
                    elif key == "core id":
                        core = val
                    elif not key and cpu is not None:
                        if allowed is None or cpu in allowed:
                            cores.add((phys or "0", core or str(cpu)))
                        cpu = phys = core = None
            if cores:
                return len(cores)
        except OSError:
            pass
    if platform.system() == "Darwin":
        try:
            # Performance cores only: efficiency cores slow a llama.cpp thread pool down.
            out = subprocess.run(["sysctl", "-n", "hw.perflevel0.physicalcpu"], capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip().isdigit():
                return int(out.stdout)
        except OSError:
            pass
    return len(allowed) if allowed else (os.cpu_count() or 1)


def gpu_layers_for(device: Device, gpu_layers: int | None) -> int:
    """Layers to offload. Asking for a GPU this llama.cpp build cannot use is an error, not a silent CPU run."""
    import llama_cpp.llama_cpp as ll

    if gpu_layers is not None and gpu_layers < -1:
        raise UsageError(f"--gpu-layers must be -1 (all) or >= 0, got {gpu_layers}")
    offload = bool(ll.llama_supports_gpu_offload())
    if device == "cpu":
        if gpu_layers:
            raise UsageError("--gpu-layers needs --device cuda, metal or auto")
        return 0
    if device == "auto":
        return (999 if gpu_layers in (None, -1) else gpu_layers) if offload else 0
    if not offload:
        raise UsageError(
            f"--device {device}: this llama-cpp-python build has no GPU backend; reinstall it with "
            f"CMAKE_ARGS=\"-DGGML_{'CUDA' if device == 'cuda' else 'METAL'}=on\" pip install --force-reinstall "
            "--no-cache-dir llama-cpp-python"
        )
    return 999 if gpu_layers in (None, -1) else gpu_layers
