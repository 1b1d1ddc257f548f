"""TensorRT backend: builds and runs backbone engines (TensorRT 10 Python API, JetPack 6).

``import tensorrt`` only inside functions.

Build: Builder -> create_network(0) (explicit batch is the only mode in TRT 10) -> OnnxParser
.parse_from_file (every error printed) -> optimisation profile for the dynamic dims ->
workspace pool limit -> FP16 where the GPU has fast FP16 -> timing cache (loaded, saved back)
-> build_serialized_network. Run: deserialize_cuda_engine, one execution context,
set_input_shape / set_tensor_address / execute_async_v3 on a non-default stream, with device
buffers from cuda-python (:mod:`export.backends.cudart`), so that the serving process stays
torch-free; where cuda-python is not installed, torch CUDA tensors and a torch stream instead.
No pycuda. Until the engine is built (in the background, cached on disk) ``extract`` is served
by ONNX Runtime. Version differences live in the ``_v_*`` helpers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from export.backends import cudart, register
from export.backends.base import Backend
from export.engine_cache import BackgroundBuild, BuildProgress, EngineCache, EngineKey
from export.errors import BackendUnavailableError, EngineBuildError
from export.manifest import verify_files
from export.taps import INPUT_NAME

log = logging.getLogger(__name__)
WORKSPACE_MIB = 1024


def _trt_major(trt: Any) -> int:
    return int(trt.__version__.split(".")[0])


def _v_network_flags(trt: Any) -> int:
    # TRT 10+: explicit batch is implied and the flag is deprecated; TRT 8 needed it.
    if _trt_major(trt) >= 10:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def _v_set_workspace(trt: Any, config: Any, nbytes: int) -> None:
    if hasattr(config, "set_memory_pool_limit"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, nbytes)
    else:  # TRT < 8.4
        config.max_workspace_size = nbytes


def _v_enable_fp16(trt: Any, builder: Any, config: Any) -> bool:
    """FP16 where it pays. TRT 11 removed the precision flags (precision then comes from the graph)."""
    if not hasattr(trt.BuilderFlag, "FP16"):
        log.info("TensorRT %s has no BuilderFlag.FP16; precision follows the ONNX graph", trt.__version__)
        return False
    if not getattr(builder, "platform_has_fast_fp16", True):
        return False
    config.set_flag(trt.BuilderFlag.FP16)
    return True


def _v_progress_monitor(trt: Any, config: Any, progress: BuildProgress) -> Any:
    """Attach an IProgressMonitor (TRT >= 10) that updates ``progress``; returns it (keep alive)."""
    if not hasattr(trt, "IProgressMonitor") or not hasattr(config, "progress_monitor"):
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.steps: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.steps[phase_name] = max(num_steps, 1)
            if parent_phase is None:
                progress.phase = phase_name

        def step_complete(self, phase_name: str, step: int) -> bool:
            if phase_name == progress.phase:
                progress.fraction = min(0.99, (step + 1) / self.steps.get(phase_name, 1))
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            self.steps.pop(phase_name, None)

    monitor = Monitor()
    config.progress_monitor = monitor
    return monitor


def _profile_shapes(manifest: dict[str, Any], max_batch: int) -> tuple[tuple[int, ...], ...]:
    spec = manifest["input"]
    opt = tuple(int(v) for v in spec["opt_shape"])
    mx = tuple(int(v) for v in spec["max_shape"])
    mn = tuple(1 if (i == 0 or d is None) else int(d) for i, d in enumerate(spec["shape"]))
    if spec.get("min_hw"):
        mn = (1, spec["min_hw"], spec["min_hw"], *mn[3:])
    mx = (max_batch, *mx[1:])
    return mn, opt, mx


def build_engine(onnx_path: Path, manifest: dict[str, Any], cache: EngineCache, key: EngineKey, *,
                 fp16: bool, max_batch: int, progress: BuildProgress) -> bytes:
    """Parse ``onnx_path`` and build a serialized engine; EngineBuildError on any failure."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if builder is None:
        raise EngineBuildError("trt.Builder returned None (no CUDA device?)")
    network = builder.create_network(_v_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    progress.phase = "parsing"
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"{onnx_path}: ONNX parser failed: " + " | ".join(errors))
    config = builder.create_builder_config()
    _v_set_workspace(trt, config, WORKSPACE_MIB << 20)
    if fp16:
        _v_enable_fp16(trt, builder, config)
    profile = builder.create_optimization_profile()
    mn, opt, mx = _profile_shapes(manifest, max_batch)
    profile.set_shape(INPUT_NAME, mn, opt, mx)
    if config.add_optimization_profile(profile) < 0:
        raise EngineBuildError(f"invalid optimisation profile {mn}/{opt}/{mx}")
    tc_path = cache.timing_cache_path(key.trt_version, key.compute_capability)
    timing = config.create_timing_cache(tc_path.read_bytes() if tc_path.exists() else b"")
    if timing is None or not config.set_timing_cache(timing, ignore_mismatch=False):
        log.warning("timing cache %s unusable; building without it", tc_path)
    monitor = _v_progress_monitor(trt, config, progress)
    progress.phase = "building"
    serialized = builder.build_serialized_network(network, config)
    del monitor
    if serialized is None:
        raise EngineBuildError(f"{onnx_path}: build_serialized_network returned None (see TensorRT log)")
    tc = config.get_timing_cache()
    if tc is not None:
        tc_path.parent.mkdir(parents=True, exist_ok=True)
        tc_path.write_bytes(bytes(tc.serialize()))
    return bytes(serialized)


class EngineRunner:
    """Executes a deserialized engine on a non-default CUDA stream (cuda-python, else torch)."""

    def __init__(self, data: bytes, output_names: list[str]) -> None:
        import tensorrt as trt

        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise EngineBuildError("deserialize_cuda_engine returned None (engine from another TensorRT/GPU?)")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineBuildError("create_execution_context returned None")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if self.inputs != [INPUT_NAME] or sorted(self.outputs) != sorted(output_names):
            raise EngineBuildError(f"engine I/O {self.inputs}->{self.outputs} differs from manifest {output_names}")
        self.outputs = list(output_names)
        cuda = _cuda()
        self._torch: Any = None
        if cuda is not None:
            self._cuda = cuda
            self._bufs = cudart.DeviceBuffers(self._cuda)
            self.stream = self._cuda.stream()
            self._np = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
            return
        import torch  # no cuda-python: torch CUDA tensors (the serving process then holds torch)

        self._torch = torch
        self.stream = torch.cuda.Stream()
        self._dtypes = {n: self._torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}

    def _torch_dtype(self, trt: Any, dt: Any) -> Any:
        t = self._torch
        table = {trt.DataType.FLOAT: t.float32, trt.DataType.HALF: t.float16, trt.DataType.INT32: t.int32,
                 trt.DataType.UINT8: t.uint8, trt.DataType.BOOL: t.bool}
        if dt not in table:
            raise EngineBuildError(f"unsupported engine tensor dtype {dt}")
        return table[dt]

    def _set_input_shape(self, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(INPUT_NAME, shape):
            raise EngineBuildError(f"input shape {shape} outside the engine's optimisation profile")

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        return self._run_torch(x) if self._torch is not None else self._run_cudart(x)

    def _run_cudart(self, x: np.ndarray) -> list[np.ndarray]:
        cuda = self._cuda
        inp = np.ascontiguousarray(x, dtype=self._np[INPUT_NAME])
        self._set_input_shape(tuple(inp.shape))
        ptr = self._bufs.get(INPUT_NAME, inp.nbytes)
        cuda.to_device(ptr, inp, self.stream)
        self.context.set_tensor_address(INPUT_NAME, ptr)
        outs = []
        for name in self.outputs:
            host = np.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._np[name])
            dptr = self._bufs.get(name, host.nbytes)
            self.context.set_tensor_address(name, dptr)
            outs.append((host, dptr))
        if not self.context.execute_async_v3(int(self.stream)):
            raise EngineBuildError("execute_async_v3 failed")
        for host, dptr in outs:
            cuda.to_host(host, dptr, self.stream)
        cuda.synchronize(self.stream)  # inp and the host arrays stay alive until here
        return [host.astype(np.float32, copy=False) for host, _ in outs]

    def _run_torch(self, x: np.ndarray) -> list[np.ndarray]:
        torch = self._torch
        with torch.cuda.stream(self.stream):
            inp = torch.from_numpy(x).to("cuda", non_blocking=False).to(self._dtypes[INPUT_NAME]).contiguous()
            self._set_input_shape(tuple(inp.shape))
            self.context.set_tensor_address(INPUT_NAME, inp.data_ptr())
            outs = []
            for name in self.outputs:
                out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._dtypes[name], device="cuda")
                self.context.set_tensor_address(name, out.data_ptr())
                outs.append(out)
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise EngineBuildError("execute_async_v3 failed")
        self.stream.synchronize()
        return [o.float().cpu().numpy() for o in outs]


def _cuda() -> cudart.CudaRuntime | None:
    """cuda-python's runtime when it is installed and reaches a GPU, else None (then torch is used).

    cuda-python's major version must not be newer than the driver's CUDA (12 on JetPack 6, 13 on
    JetPack 7); a mismatch shows as cudaErrorInsufficientDriver here, and torch takes over."""
    rt = cudart.load()
    if rt is None:
        return None
    cuda = cudart.CudaRuntime(rt)
    try:
        if cuda.device_count() > 0:
            return cuda
    except cudart.CudaError as e:
        log.warning("cuda-python cannot reach the GPU (%s); TensorRT's buffers fall back to torch", e)
    return None


def _compute_capability() -> str:
    """The GPU's compute capability ("8.7" on an Orin), for the engine cache key; torch-free if it can be."""
    cuda = _cuda()
    if cuda is not None:
        return cuda.compute_capability(0)
    import torch

    return "{}.{}".format(*torch.cuda.get_device_capability())


def _cuda_device_visible() -> tuple[bool, str]:
    if _cuda() is not None:
        return True, ""
    try:
        import torch
    except ImportError:
        return False, "no GPU reachable through cuda-python, and torch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA device visible to torch"
    return True, ""


@register
class TensorRTBackend(Backend):
    kind = "tensorrt"

    def __init__(self, manifest: dict[str, Any], model_dir: str | Path, *, engine_dir: str | Path = "engines",
                 fp16: bool = True, max_batch: int = 16, wait: bool = False, threads: int | None = None,
                 device: str = "cuda") -> None:
        super().__init__(manifest, model_dir)
        ok, why = self.available()
        if not ok:
            raise BackendUnavailableError(why)
        import tensorrt as trt

        self.onnx_path = verify_files(manifest, model_dir)
        cc = _compute_capability()
        flags = (("fp16",) if fp16 else ()) + (f"ws={WORKSPACE_MIB}MiB", f"max_batch={max_batch}")
        self.key = EngineKey(trt_version=trt.__version__, compute_capability=cc,
                             onnx_sha256=manifest["content_hash"], flags=flags)
        self.cache = EngineCache(engine_dir)
        self.runner: EngineRunner | None = None
        self.build: BackgroundBuild | None = None
        self._fallback: Backend | None = None
        data = self.cache.load(self.key)
        if data is not None:
            self.runner = EngineRunner(data, list(manifest["outputs"]))
            return
        from export.backends.onnxruntime import OnnxRuntimeBackend

        self._fallback = OnnxRuntimeBackend(manifest, model_dir, device="auto", threads=threads)
        log.info("%s: building TensorRT engine in the background; serving from onnxruntime meanwhile", self.modality)
        self.build = BackgroundBuild(
            self.modality,
            lambda p: build_engine(self.onnx_path, manifest, self.cache, self.key, fp16=fp16, max_batch=max_batch, progress=p),
            on_done=lambda d: self.cache.store(self.key, d),
        ).start()
        if wait:
            self.build.wait()
            self._adopt()

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import tensorrt  # noqa: F401
        except ImportError as e:
            return False, f"tensorrt not importable ({e})"
        return _cuda_device_visible()

    @property
    def ready(self) -> bool:
        return self.runner is not None

    def _adopt(self) -> None:
        if self.build is None or not self.build.done:
            return
        if self.build.progress.error:
            raise EngineBuildError(f"{self.onnx_path}: {self.build.progress.error}")
        self.runner = EngineRunner(self.build.result or b"", list(self.manifest["outputs"]))
        self.build = None
        log.info("%s: TensorRT engine ready", self.modality)

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        if self.runner is None:
            self._adopt()
        if self.runner is not None:
            return self.runner.run(x)
        assert self._fallback is not None
        return self._fallback._run(x)
