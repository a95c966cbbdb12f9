"""Datasheet numbers of known GPUs: one table the measurement (bench/measure/peak_flops.py: MFU's peak) and the
planner (bench/plan: step-time predictions for a device not at hand) both read. A leaf: imports nothing.

Peaks are **dense** (no 2:4 sparsity) tensor-core FLOP/s per GPU from NVIDIA's datasheets (sparse figures
halved): H100 SXM5/PCIe/NVL -- "NVIDIA H100 Tensor Core GPU" datasheet; H200 SXM/NVL -- "NVIDIA H200 Tensor
Core GPU" datasheet; A100 -- "NVIDIA A100 Tensor Core GPU" datasheet (80 GB SXM for the bandwidth); L4, L40S,
A10 -- their product datasheets; V100 -- "NVIDIA V100" datasheet. A10G has no NVIDIA datasheet: the figures
are those AWS quotes for G5 instances, marked as such. 'fp32' is the non-tensor-core FP32 peak, 'tf32' the
TF32 tensor-core peak. ``HBM_BANDWIDTH``: memory bandwidth, bytes/s, from the same datasheets.
"""

from __future__ import annotations

T = 1e12
# (substring of torch.cuda.get_device_name(), label, {dtype: dense FLOP/s}, source). First match wins,
# so more specific names (NVL, PCIe, A10G) come before the generic ones.
GPU_TABLE: list[tuple[str, str, dict, str]] = [
    ("H100 NVL", "H100 NVL", {"fp32": 60 * T, "tf32": 417.5 * T, "bf16": 835.5 * T, "fp16": 835.5 * T},
     "NVIDIA H100 datasheet (NVL)"),
    ("H100 PCIe", "H100 PCIe", {"fp32": 51.2 * T, "tf32": 378 * T, "bf16": 756 * T, "fp16": 756 * T},
     "NVIDIA H100 datasheet (PCIe)"),
    ("H100", "H100 SXM5", {"fp32": 66.9 * T, "tf32": 494.7 * T, "bf16": 989.4 * T, "fp16": 989.4 * T},
     "NVIDIA H100 datasheet (SXM5)"),
    ("H200 NVL", "H200 NVL", {"fp32": 60 * T, "tf32": 417.5 * T, "bf16": 835.5 * T, "fp16": 835.5 * T},
     "NVIDIA H200 datasheet (NVL)"),
    ("H200", "H200 SXM", {"fp32": 66.9 * T, "tf32": 494.7 * T, "bf16": 989.4 * T, "fp16": 989.4 * T},
     "NVIDIA H200 datasheet (SXM)"),
    ("A100", "A100", {"fp32": 19.5 * T, "tf32": 156 * T, "bf16": 312 * T, "fp16": 312 * T},
     "NVIDIA A100 datasheet"),
    ("L40S", "L40S", {"fp32": 91.6 * T, "tf32": 183 * T, "bf16": 362.05 * T, "fp16": 362.05 * T},
     "NVIDIA L40S datasheet"),
    ("L4", "L4", {"fp32": 30.3 * T, "tf32": 60 * T, "bf16": 121 * T, "fp16": 121 * T}, "NVIDIA L4 datasheet"),
    ("A10G", "A10G", {"fp32": 31.2 * T, "tf32": 35 * T, "bf16": 70 * T, "fp16": 70 * T},
     "AWS G5 instance figures (no NVIDIA A10G datasheet)"),
    ("A10", "A10", {"fp32": 31.2 * T, "tf32": 62.5 * T, "bf16": 125 * T, "fp16": 125 * T}, "NVIDIA A10 datasheet"),
    ("V100", "V100", {"fp32": 15.7 * T, "fp16": 125 * T}, "NVIDIA V100 datasheet (SXM2)"),
]


# label -> memory bandwidth in bytes/s (datasheets as above)
HBM_BANDWIDTH = {"H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100 SXM5": 3.35e12, "H200 NVL": 4.8e12,
                 "H200 SXM": 4.8e12, "A100": 2.039e12, "L40S": 0.864e12, "L4": 0.3e12, "A10G": 0.6e12,
                 "A10": 0.6e12, "V100": 0.9e12}
assert set(HBM_BANDWIDTH) == {row[1] for row in GPU_TABLE}


def lookup_device(name: str) -> tuple[str, dict, float] | None:
    """(label, dense FLOP/s by dtype, memory bytes/s) of the first table entry whose pattern is in ``name``."""
    for pattern, label, peaks, _ in GPU_TABLE:
        if pattern in name:
            return label, peaks, HBM_BANDWIDTH[label]
    return None


def lookup_gpu_peak(device_name: str, dtype: str) -> tuple[float, str] | None:
    """(FLOP/s, source) for a known GPU name and dtype, or None when the table has no entry."""
    for pattern, label, peaks, source in GPU_TABLE:
        if pattern in device_name:
            if dtype not in peaks:
                return None
            return peaks[dtype], f"table:{label} {dtype} ({source})"
    return None
