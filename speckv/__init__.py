"""speckv: an LLM serving engine around a disaggregated, tiered, prefetched KV cache."""

from speckv.config import EngineConfig
from speckv.engine.llm import LLM
from speckv.engine.llm_engine import LLMEngine
from speckv.engine.outputs import RequestOutput
from speckv.engine.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
