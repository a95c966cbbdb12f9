"""GPU telemetry from NVML (package nvidia-ml-py, imported as pynvml), sampled in a background thread.

Over the timed window, per device:
- ``gpu_util_pct``: mean of nvmlDeviceGetUtilizationRates().gpu samples, percent;
- ``gpu_power_w``: mean of nvmlDeviceGetPowerUsage samples, watts;
- ``gpu_energy_j``: nvmlDeviceGetTotalEnergyConsumption difference (mJ counter, Volta and newer),
  or, where unsupported, the trapezoid integral of the power samples, joules;
- ``gpu_mem_used_bytes``: max of nvmlDeviceGetMemoryInfo().used (all processes on the device), bytes;
- ``gpu_sm_clock_mhz`` / ``gpu_sm_clock_min_mhz``: mean / min of nvmlDeviceGetClockInfo(NVML_CLOCK_SM), MHz;
- ``gpu_throttle_reasons``: the clock-event (throttle) reasons seen in any sample, by name -- power cap,
  thermal or hardware slowdown, sync boost ... (GPU idle and the applications-clock setting left out).
Across ranks: utilisation, power and clock averaged (clock min: min), energy summed, memory max'd,
throttle reasons united; then
``energy_per_token_j`` = total energy / tokens trained in the window.
On CPU or without a driver every value is absent (None) -- never an error.
"""

from __future__ import annotations

import threading
import time


def _load_pynvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no package, no driver, no GPU: telemetry is simply absent
        return None


class NvmlSampler:
    """``start()`` / ``stop() -> dict`` around the timed window; sampling every ``interval_s`` seconds."""

    def __init__(self, device_index: int | None, interval_s: float = 0.1):
        self.interval_s = interval_s
        self.nvml = _load_pynvml() if device_index is not None else None
        self.handle = self.nvml.nvmlDeviceGetHandleByIndex(device_index) if self.nvml else None
        self._stop = threading.Event()
        self._thread = None
        self.samples: list[tuple[float, float | None, float | None, int | None]] = []
        self.clocks: list[float] = []
        self.reasons = 0
        self._energy0 = None
        self._t0 = 0.0

    @property
    def available(self) -> bool:
        return self.handle is not None

    def _energy_mj(self):
        try:
            return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except Exception:
            return None

    def _sample(self) -> None:
        now = time.perf_counter()
        util = power = mem = None
        try:
            util = float(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
        except Exception:
            pass
        try:
            power = self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0
        except Exception:
            pass
        try:
            mem = int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)
        except Exception:
            pass
        self.samples.append((now, util, power, mem))
        try:
            self.clocks.append(float(self.nvml.nvmlDeviceGetClockInfo(self.handle, self.nvml.NVML_CLOCK_SM)))
        except Exception:
            pass
        try:
            self.reasons |= int(self.nvml.nvmlDeviceGetCurrentClocksEventReasons(self.handle))
        except Exception:
            pass

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):  # blocks between samples: no busy wait
            self._sample()

    def start(self) -> None:
        if not self.available:
            return
        self._t0 = time.perf_counter()
        self._energy0 = self._energy_mj()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> dict:
        """Stop sampling; the window's statistics (all None when unavailable)."""
        empty = {"gpu_util_pct": None, "gpu_power_w": None, "gpu_energy_j": None, "gpu_mem_used_bytes": None,
                 "gpu_sm_clock_mhz": None, "gpu_sm_clock_min_mhz": None, "gpu_throttle_reasons": None}
        if not self.available:
            return empty
        self._stop.set()
        if self._thread:
            self._thread.join()
        self._sample()
        energy1 = self._energy_mj()
        utils = [s[1] for s in self.samples if s[1] is not None]
        powers = [(s[0], s[2]) for s in self.samples if s[2] is not None]
        mems = [s[3] for s in self.samples if s[3] is not None]
        if self._energy0 is not None and energy1 is not None:
            energy = (energy1 - self._energy0) / 1000.0
        elif len(powers) >= 2:
            energy = sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(powers, powers[1:]))
        else:
            energy = None
        return {
            "gpu_util_pct": sum(utils) / len(utils) if utils else None,
            "gpu_power_w": sum(p for _, p in powers) / len(powers) if powers else None,
            "gpu_energy_j": energy,
            "gpu_mem_used_bytes": max(mems) if mems else None,
            "gpu_sm_clock_mhz": sum(self.clocks) / len(self.clocks) if self.clocks else None,
            "gpu_sm_clock_min_mhz": min(self.clocks) if self.clocks else None,
            "gpu_throttle_reasons": throttle_names(self.nvml, self.reasons),
        }


def throttle_names(nvml, mask: int) -> list[str]:
    """Names of the clock-event reasons set in ``mask`` (pynvml's nvmlClocksEventReason* constants), without
    GpuIdle and ApplicationsClocksSetting, which say nothing about a slowed training step."""
    skip = {"All", "None", "GpuIdle", "ApplicationsClocksSetting"}
    prefix = "nvmlClocksEventReason"
    return sorted(n[len(prefix):] for n in dir(nvml) if n.startswith(prefix) and n[len(prefix):] not in skip
                  and isinstance(getattr(nvml, n), int) and mask & getattr(nvml, n))


def energy_per_token(energy_j: float | None, tokens: int) -> float | None:
    """GPU energy over the timed steps (all GPUs, J) / tokens trained in them, J/token; None without energy."""
    return energy_j / tokens if (energy_j is not None and tokens) else None
