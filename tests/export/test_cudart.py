"""cuda-python calls of the TensorRT runner: checked errors here (no GPU), a real round trip where a GPU is."""

from __future__ import annotations

import numpy as np
import pytest

from export.backends import cudart

RT = cudart.load()
GPU = False
if RT is not None:
    try:
        GPU = cudart.CudaRuntime(RT).device_count() > 0
    except cudart.CudaError:
        GPU = False


@pytest.mark.skipif(RT is None, reason="cuda-python is not installed")
@pytest.mark.skipif(GPU, reason="a GPU is visible: the no-device error cannot be seen here")
def test_a_failed_call_raises_naming_the_call_and_the_error():
    cuda = cudart.CudaRuntime(RT)
    with pytest.raises(cudart.CudaError, match=r"cudaGetDeviceCount failed: cudaError\w+"):
        cuda.device_count()
    with pytest.raises(cudart.CudaError, match=r"cudaMalloc failed"):
        cuda.malloc(1024)


def test_missing_cuda_python_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(cudart, "load", lambda: None)
    with pytest.raises(cudart.CudaError, match="cuda-python is not installed"):
        cudart.CudaRuntime()


class _Counting:
    """The two calls DeviceBuffers makes, counted: it is the reuse policy under test, not CUDA."""

    def __init__(self) -> None:
        self.next, self.live, self.mallocs = 1, set(), 0

    def malloc(self, nbytes: int) -> int:
        self.mallocs += 1
        ptr, self.next = self.next, self.next + nbytes
        self.live.add(ptr)
        return ptr

    def free(self, ptr: int) -> None:
        self.live.remove(ptr)


def test_device_buffers_grow_only_and_free_everything():
    cuda = _Counting()
    bufs = cudart.DeviceBuffers(cuda)  # type: ignore[arg-type]
    a = bufs.get("input", 1000)
    assert bufs.get("input", 800) == a and cuda.mallocs == 1  # smaller batch: same buffer
    b = bufs.get("input", 4000)
    assert b != a and cuda.mallocs == 2 and a not in cuda.live  # larger: the old one is freed
    bufs.get("probs", 16)
    assert len(cuda.live) == 2
    bufs.close()
    assert not cuda.live


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU reachable through cuda-python")
def test_host_device_round_trip_on_a_gpu():
    cuda = cudart.CudaRuntime(RT)
    stream = cuda.stream()
    x = np.arange(4096, dtype=np.float32).reshape(64, 64)
    ptr = cuda.malloc(x.nbytes)
    try:
        cuda.to_device(ptr, x, stream)
        y = np.empty_like(x)
        cuda.to_host(y, ptr, stream)
        cuda.synchronize(stream)
    finally:
        cuda.free(ptr)
    np.testing.assert_array_equal(x, y)
    assert cuda.compute_capability().count(".") == 1
