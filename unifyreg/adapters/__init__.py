"""Adapters: one per model family, all returning :class:`ForwardOutput` (DESIGN.md)."""

from unifyreg.adapters.base import (
    ADAPTERS,
    Adapter,
    ForwardOutput,
    available_adapters,
    get_adapter_class,
    register_adapter,
)
from unifyreg.adapters.toy import ToyAdapter, ToyModelConfig

__all__ = [
    "ADAPTERS",
    "Adapter",
    "ForwardOutput",
    "ToyAdapter",
    "ToyModelConfig",
    "available_adapters",
    "get_adapter_class",
    "register_adapter",
]
