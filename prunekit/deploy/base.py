"""The runner interface every backend implements (Polygraphy-style: load, infer, close).

A runner takes and returns named numpy arrays, so the comparator and the benchmark harness know
nothing of backends. This module must not import torch: the edge runtime depends on it.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class BackendUnavailable(RuntimeError):
    """A backend that cannot run here (library not installed, no GPU); ``reason`` says why."""

    def __init__(self, backend: str, reason: str):
        super().__init__(f"backend {backend} unavailable: {reason}")
        self.backend = backend
        self.reason = reason


@dataclass
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # str for dynamic axes ("batch")
    dtype: str  # numpy dtype name


@dataclass
class RunnerInfo:
    backend: str  # "ort-cpu", "ort-cuda", "ort-trt", "trt", "torch", "torch-compile", ...
    device: str  # "cpu", "cuda:0", GPU name...
    precision: str = "fp32"
    extra: dict[str, Any] = field(default_factory=dict)


class Runner(abc.ABC):
    """Load once, ``infer`` many times, ``close``. Usable as a context manager.

    ``infer`` takes ``{input_name: array}`` and returns ``{output_name: array}`` (host numpy,
    float32 unless the output is integral). ``synchronize`` blocks until queued device work is
    done, so that wall-clock timing around ``infer`` is honest on asynchronous backends.
    """

    info: RunnerInfo

    @abc.abstractmethod
    def load(self) -> Runner: ...

    @property
    @abc.abstractmethod
    def input_spec(self) -> list[TensorSpec]: ...

    @abc.abstractmethod
    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def synchronize(self) -> None:  # noqa: B027 - host backends have nothing to wait for
        pass

    def close(self) -> None:  # noqa: B027
        pass

    def __enter__(self) -> Runner:
        return self.load()

    def __exit__(self, *exc: object) -> None:
        self.close()
