"""One exception family for maia-onnx: user-input problems become one-line CLI errors."""

from __future__ import annotations


class MaiaOnnxError(Exception):
    """Base class of every error maia-onnx raises on purpose."""

    exit_code = 1


class UserError(MaiaOnnxError):
    """Bad input from the user: the message says what, where and how to fix it."""

    exit_code = 2


class ModelLoadError(UserError):
    """A model file (or its external data) cannot be read."""


class InvalidOptionError(UserError):
    """An option value is impossible for this model or command."""


class UnsupportedModelError(UserError):
    """The model is valid ONNX but this tool cannot process it (say why and what to do)."""


class ValidationError(MaiaOnnxError):
    """A transform produced an invalid or numerically wrong model (a bug, not the user's fault)."""

    exit_code = 3


class MissingExtraError(UserError):
    """An optional dependency is not installed: name the feature and the extra that brings it."""

    def __init__(self, feature: str, extra: str, detail: str | None = None):
        super().__init__(detail or f"{feature} needs the optional '{extra}' dependencies: pip install 'maia-onnx[{extra}]'")
        self.extra = extra


class InputError(UserError):
    """Input feeds the model cannot take (dtype, shape or values): name the input and how to fix it."""
