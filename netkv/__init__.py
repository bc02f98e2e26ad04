"""NetKV: network-aware decode-instance selection for disaggregated LLM inference."""

__version__ = "0.1.0"
