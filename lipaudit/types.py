"""String enums for the values that cross module boundaries (kinds, methods, modes, severities)."""

from __future__ import annotations

from enum import StrEnum


class Kind(StrEnum):
    """A layer's kind as the report names it."""

    LINEAR = "linear"
    CONV1D = "conv1d"
    CONV2D = "conv2d"
    CONV3D = "conv3d"
    BATCHNORM = "batchnorm"
    EMBEDDING = "embedding"
    NORM = "norm"
    RNN = "rnn"
    OTHER = "other"


class Method(StrEnum):
    AUTO = "auto"
    EXACT = "exact"
    FAST = "fast"


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


class Mode(StrEnum):
    DIVIDE = "divide"
    CLIP = "clip"


class ConvNorm(StrEnum):
    OPERATOR = "operator"
    RESHAPE = "reshape"


class Device(StrEnum):
    CPU = "cpu"
    CUDA = "cuda"
    AUTO = "auto"
