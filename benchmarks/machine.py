"""What the benchmarks ran on, for their printouts."""

from __future__ import annotations

import platform

import torch


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as info:
                name = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return f"{device.type}: {name}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
