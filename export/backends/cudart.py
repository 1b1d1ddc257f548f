"""The few CUDA runtime calls the TensorRT runner needs, through NVIDIA's cuda-python bindings.

Why not torch: the serving process must not import torch (its CUDA build adds ~450 MB of
resident memory, and a Jetson shares its memory between CPU and GPU). TensorRT only needs device
buffers, a stream and two copies, which ``cuda.bindings.runtime`` (cuda-python 12.8+; before
that ``cuda.cudart``) provides without torch. Every call returns ``(error, *values)``; a failure
raises :class:`CudaError` naming the call and the error, never a silent wrong result.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class CudaError(RuntimeError):
    """A CUDA runtime call failed (no device, no driver, out of memory...)."""


def load() -> Any | None:
    """The cuda-python runtime module, or None when cuda-python is not installed."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.8
        except ImportError:
            return None
    return runtime


class CudaRuntime:
    """Checked wrappers of the calls used by :class:`export.backends.tensorrt.EngineRunner`."""

    def __init__(self, rt: Any | None = None) -> None:
        self.rt = rt or load()
        if self.rt is None:
            raise CudaError("cuda-python is not installed (pip install cuda-python)")

    def _call(self, name: str, *args: Any) -> Any:
        out = getattr(self.rt, name)(*args)
        err, values = out[0], out[1:]
        if err != self.rt.cudaError_t.cudaSuccess:
            raise CudaError(f"{name} failed: {getattr(err, 'name', err)}")
        return values[0] if len(values) == 1 else (values or None)

    def device_count(self) -> int:
        return int(self._call("cudaGetDeviceCount"))

    def compute_capability(self, device: int = 0) -> str:
        attr = self.rt.cudaDeviceAttr
        major = self._call("cudaDeviceGetAttribute", attr.cudaDevAttrComputeCapabilityMajor, device)
        minor = self._call("cudaDeviceGetAttribute", attr.cudaDevAttrComputeCapabilityMinor, device)
        return f"{major}.{minor}"

    def stream(self) -> Any:
        return self._call("cudaStreamCreate")

    def malloc(self, nbytes: int) -> int:
        return int(self._call("cudaMalloc", max(int(nbytes), 1)))

    def free(self, ptr: int) -> None:
        self._call("cudaFree", ptr)

    def to_device(self, dst: int, host: np.ndarray, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call("cudaMemcpyAsync", dst, host.ctypes.data, host.nbytes, kind, stream)

    def to_host(self, host: np.ndarray, src: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call("cudaMemcpyAsync", host.ctypes.data, src, host.nbytes, kind, stream)

    def synchronize(self, stream: Any) -> None:
        self._call("cudaStreamSynchronize", stream)


class DeviceBuffers:
    """One grow-only device buffer per tensor name: no cudaMalloc per frame once sizes settle."""

    def __init__(self, cuda: CudaRuntime) -> None:
        self.cuda = cuda
        self._bufs: dict[str, tuple[int, int]] = {}  # name -> (pointer, bytes)

    def get(self, name: str, nbytes: int) -> int:
        ptr, size = self._bufs.get(name, (0, 0))
        if nbytes > size:
            if ptr:
                self.cuda.free(ptr)
            ptr, size = self.cuda.malloc(nbytes), nbytes
            self._bufs[name] = (ptr, size)
        return ptr

    def close(self) -> None:
        for ptr, _ in self._bufs.values():
            self.cuda.free(ptr)
        self._bufs.clear()
