"""Adapters: one per model family, all returning :class:`ForwardOutput` (DESIGN.md)."""

from unifyreg.adapters.base import (
    ADAPTERS,
    Adapter,
    ForwardOutput,
    available_adapters,
    get_adapter_class,
    register_adapter,
)
from unifyreg.adapters.chameleon import ChameleonAdapter
from unifyreg.adapters.emu3 import Emu3Adapter
from unifyreg.adapters.janus import JanusAdapter
from unifyreg.adapters.toy import ToyAdapter, ToyModelConfig

__all__ = [
    "ADAPTERS",
    "Adapter",
    "ChameleonAdapter",
    "Emu3Adapter",
    "ForwardOutput",
    "JanusAdapter",
    "ToyAdapter",
    "ToyModelConfig",
    "available_adapters",
    "get_adapter_class",
    "register_adapter",
]
