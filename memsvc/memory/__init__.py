"""Titans neural long-term memory: config, state and the streaming module."""

from memsvc.memory.config import MemoryConfig
from memsvc.memory.neural_memory import NeuralMemory
from memsvc.memory.state import MemoryState, NonFiniteStateError

__all__ = ["MemoryConfig", "MemoryState", "NeuralMemory", "NonFiniteStateError"]
