"""ONNX Runtime runners: CPU, CUDA and TensorRT execution providers, chosen by name.

A requested provider that onnxruntime does not offer here is refused with
:class:`BackendUnavailable`; ORT would otherwise fall back to CPU silently and every number
measured afterwards would be a lie about the backend. Torch-free.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from prunekit.deploy.base import BackendUnavailable, Runner, RunnerInfo, TensorSpec
from prunekit.deploy.lazy import import_optional

log = logging.getLogger(__name__)

BACKEND_PROVIDERS = {
    "ort-cpu": "CPUExecutionProvider",
    "ort-cuda": "CUDAExecutionProvider",
    "ort-trt": "TensorrtExecutionProvider",
}
OPT_LEVELS = ("disable", "basic", "extended", "all")
_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def _ort(backend: str) -> Any:
    return import_optional(
        "onnxruntime", backend, "pip install onnxruntime (or onnxruntime-gpu for CUDA/TensorRT)"
    )


def provider_unavailable(backend: str) -> str | None:
    """Why ``backend`` cannot run here, or None when its execution provider is available."""
    try:
        ort = _ort(backend)
    except BackendUnavailable as e:
        return e.reason
    provider = BACKEND_PROVIDERS[backend]
    available = ort.get_available_providers()
    if provider not in available:
        return f"onnxruntime {ort.__version__} has no {provider} (available: {', '.join(available)})"
    return None


def session_options(
    opt_level: str = "all",
    intra_op_threads: int | None = None,
    inter_op_threads: int | None = None,
    optimized_model_path: str | os.PathLike | None = None,
    spinning: bool | None = None,
) -> Any:
    """``SessionOptions`` with the graph optimisation level, thread counts and optimised-model output.

    ``spinning=False`` stops the thread pools busy-waiting for work after a run. ORT spins by
    default, which suits one session alone; several sessions in one process (a benchmark timing
    models interleaved) then steal each other's cores, and the faster model pays the most.
    """
    ort = _ort("ort")
    if opt_level not in OPT_LEVELS:
        raise ValueError(f"unknown graph optimisation level {opt_level!r}; expected one of {OPT_LEVELS}")
    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: ORT's optimiser warnings are noise for users
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    if intra_op_threads:
        so.intra_op_num_threads = int(intra_op_threads)
    if inter_op_threads:
        so.inter_op_num_threads = int(inter_op_threads)
    if optimized_model_path is not None:
        Path(optimized_model_path).parent.mkdir(parents=True, exist_ok=True)
        so.optimized_model_filepath = str(optimized_model_path)
    if spinning is not None:
        flag = "1" if spinning else "0"
        so.add_session_config_entry("session.intra_op.allow_spinning", flag)
        so.add_session_config_entry("session.inter_op.allow_spinning", flag)
    return so


def trt_provider_options(
    precision: str,
    cache_dir: str | os.PathLike | None,
    workspace_mb: int | None = None,
    input_name: str = "images",
    chw: tuple[int, int, int] | None = None,
    batch: tuple[int, int, int] | None = None,
    device_id: int = 0,
    explicit_int8: bool = False,
) -> dict[str, Any]:
    """TensorRT EP options: precision, the EP's own engine and timing caches on disk, the batch profile.

    INT8 is explicit only: the model carries its own Q/DQ nodes (``prunekit quantize --target
    tensorrt``) and TensorRT takes the scales from the graph, so one INT8 file serves ORT CPU, this
    EP and TensorRT. No calibration table: the EP's implicit-calibration path reads a format of its
    own and TensorRT 11 dropped implicit INT8 altogether.
    """
    if precision == "int8" and not explicit_int8:
        raise ValueError(
            "ort-trt runs INT8 from a Q/DQ model only: quantize it with `prunekit quantize --target tensorrt` "
            "and give that file"
        )
    opts: dict[str, Any] = {"device_id": device_id}
    if precision == "fp16":
        opts["trt_fp16_enable"] = True
    elif precision == "int8":
        opts["trt_int8_enable"] = True
        opts["trt_fp16_enable"] = (
            True  # the float layers between Q/DQ pairs run in FP16, as trtexec --int8 --fp16
        )
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        opts.update(
            trt_engine_cache_enable=True,
            trt_engine_cache_path=str(cache_dir),
            trt_timing_cache_enable=True,
            trt_timing_cache_path=str(cache_dir),
        )
    if workspace_mb:
        opts["trt_max_workspace_size"] = int(workspace_mb) << 20
    if chw is not None and batch is not None:
        c, h, w = chw
        fmt = lambda n: f"{input_name}:{n}x{c}x{h}x{w}"  # noqa: E731
        opts["trt_profile_min_shapes"] = fmt(batch[0])
        opts["trt_profile_opt_shapes"] = fmt(batch[1])
        opts["trt_profile_max_shapes"] = fmt(batch[2])
    return opts


def _model_precision(path: Path) -> str:
    """``"int8"`` for a Q/DQ model written by ``prunekit quantize``, else ``"fp32"``."""
    from prunekit.deploy.quantize import model_precision
    from prunekit.deploy.runtime import read_metadata

    try:
        return model_precision(read_metadata(path))
    except ValueError:  # not a prunekit model: the caller's precision stands
        return "fp32"


class OrtRunner(Runner):
    """One ``InferenceSession`` pinned to one execution provider.

    ``io_binding`` (default on for CUDA/TensorRT EPs) binds inputs once per call and lets ORT
    allocate outputs on the device, copying back only at the end, instead of ORT's per-run
    host staging. ``optimized_model_path`` saves the graph ORT actually runs beside the engine.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        backend: str = "ort-cpu",
        precision: str = "fp32",
        device: str | int | None = None,
        opt_level: str = "all",
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        optimized_model_path: str | os.PathLike | None = None,
        io_binding: bool | None = None,
        provider_options: dict[str, Any] | None = None,
        cache_dir: str | os.PathLike | None = None,
        spinning: bool | None = None,
        **trt_kw: Any,
    ):
        if backend not in BACKEND_PROVIDERS:
            raise ValueError(
                f"unknown ONNX Runtime backend {backend!r}; expected one of {sorted(BACKEND_PROVIDERS)}"
            )
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"{self.model_path}: ONNX model not found")
        explicit = _model_precision(self.model_path) == "int8"
        if precision == "int8" and not explicit:
            raise ValueError(
                f"{self.model_path}: an FP32 model; INT8 on {backend} needs a Q/DQ model from `prunekit quantize`"
            )
        if explicit and precision != "int8":
            precision = "int8"  # the Q/DQ graph is INT8 whatever is asked: report what runs
        if precision == "fp16" and backend != "ort-trt":
            raise ValueError(
                f"{backend} runs the ONNX model as exported; fp16 needs --backend ort-trt or trt"
            )
        self.backend = backend
        self.provider = BACKEND_PROVIDERS[backend]
        self.device_id = _device_id(device)
        self.opt_level = opt_level
        self.threads = (intra_op_threads, inter_op_threads)
        self.spinning = spinning
        self.optimized_model_path = optimized_model_path
        self.io_binding = backend != "ort-cpu" if io_binding is None else io_binding
        self.precision = precision
        self.provider_options = dict(provider_options or {})
        if backend == "ort-trt" and explicit:
            from prunekit.deploy.trt import qdq_incompatibility

            problem = qdq_incompatibility(self.model_path)
            if problem:
                raise ValueError(problem)
        if backend == "ort-trt":
            self.provider_options = {
                **trt_provider_options(
                    precision, cache_dir, device_id=self.device_id, explicit_int8=explicit, **trt_kw
                ),
                **self.provider_options,
            }
        elif backend == "ort-cuda":
            self.provider_options.setdefault("device_id", self.device_id)
        self.session: Any = None
        dev = "cpu" if backend == "ort-cpu" else f"cuda:{self.device_id}"
        extra = {"provider": self.provider, "opt_level": opt_level}
        if spinning is not None:
            extra["thread_spinning"] = spinning
        self.info = RunnerInfo(backend, dev, precision, extra)

    def load(self) -> OrtRunner:
        if self.session is not None:
            return self
        reason = provider_unavailable(self.backend)
        if reason:
            raise BackendUnavailable(self.backend, reason)
        ort = _ort(self.backend)
        so = session_options(
            self.opt_level,
            *self.threads,
            optimized_model_path=self.optimized_model_path,
            spinning=self.spinning,
        )
        providers: list[Any] = [(self.provider, self.provider_options)]
        if self.backend == "ort-trt" and "CUDAExecutionProvider" in ort.get_available_providers():
            # Subgraphs TensorRT rejects go to CUDA; CPU stays as ORT's implicit last resort.
            providers.append(("CUDAExecutionProvider", {"device_id": self.device_id}))
        try:
            self.session = ort.InferenceSession(str(self.model_path), sess_options=so, providers=providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own Fail/InvalidGraph types
            raise ValueError(f"{self.model_path}: onnxruntime could not load the model ({e})") from e
        active = self.session.get_providers()
        if active[0] != self.provider:
            raise BackendUnavailable(
                self.backend, f"onnxruntime did not enable {self.provider} (active: {active})"
            )
        self.info.extra.update(providers=active, onnxruntime=ort.__version__)
        if self.optimized_model_path:
            self.info.extra["optimized_model"] = str(self.optimized_model_path)
        log.info("%s: %s on %s", self.backend, self.model_path.name, active)
        return self

    @property
    def input_spec(self) -> list[TensorSpec]:
        self.load()
        return [
            TensorSpec(
                i.name,
                tuple(d if d is not None else "batch" for d in i.shape),
                _ORT_DTYPES.get(i.type, i.type),
            )
            for i in self.session.get_inputs()
        ]

    @property
    def output_names(self) -> list[str]:
        self.load()
        return [o.name for o in self.session.get_outputs()]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.load()
        feed = {k: np.ascontiguousarray(v) for k, v in feed.items()}
        names = self.output_names
        if not self.io_binding:
            return dict(zip(names, self.session.run(names, feed)))
        binding = self.session.io_binding()
        for name, arr in feed.items():
            binding.bind_cpu_input(name, arr)
        for name in names:
            binding.bind_output(name, "cuda" if self.backend != "ort-cpu" else "cpu", self.device_id)
        self.session.run_with_iobinding(binding)
        return dict(zip(names, binding.copy_outputs_to_cpu()))

    def close(self) -> None:
        self.session = None


def _device_id(device: str | int | None) -> int:
    if device is None or device == "cpu" or device == "cuda":
        return 0
    if isinstance(device, int):
        return device
    if str(device).startswith("cuda:"):
        return int(str(device).split(":", 1)[1])
    raise ValueError(f"bad device {device!r}; expected cpu, cuda or cuda:N")
