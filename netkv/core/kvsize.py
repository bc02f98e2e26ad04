"""KV-cache size per token from a model description, with cited presets."""

from __future__ import annotations

from dataclasses import dataclass

from netkv.errors import InputError


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The shape of a model's KV cache.

    ``kv_planes`` is 2 for ordinary attention (one K and one V tensor per layer) and 1 for
    multi-head latent attention, whose cache holds one compressed latent per token and layer.
    """

    name: str
    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2
    kv_planes: int = 2
    source: str = ""

    def __post_init__(self) -> None:
        for field in ("layers", "kv_heads", "head_dim", "dtype_bytes", "kv_planes"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InputError(f"model.{field}", f"must be a positive integer, got {value!r}")
        if self.kv_planes not in (1, 2):
            raise InputError("model.kv_planes", "must be 1 (latent attention) or 2 (K and V)")

    @property
    def bytes_per_token(self) -> int:
        """Bytes of KV cache one token occupies across all layers."""
        return self.layers * self.kv_heads * self.head_dim * self.kv_planes * self.dtype_bytes

    def kv_bytes(self, tokens: int) -> int:
        """Bytes of KV cache for ``tokens`` tokens."""
        if tokens < 0:
            raise InputError("tokens", f"must be >= 0, got {tokens}")
        return tokens * self.bytes_per_token


PRESETS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "llama3-70b", layers=80, kv_heads=8, head_dim=128,
            source="meta-llama/Meta-Llama-3-70B config.json (80 layers, 8 KV heads, 128 dims, "
            "bf16); Mooncake FAST'25 Table 1 quotes 320 KB per token",
        ),
        ModelSpec(
            "llama3-8b", layers=32, kv_heads=8, head_dim=128,
            source="meta-llama/Meta-Llama-3-8B config.json (32 layers, 8 KV heads, 128 dims)",
        ),
        ModelSpec(
            "llama3-405b", layers=126, kv_heads=8, head_dim=128,
            source="meta-llama/Llama-3.1-405B config.json (126 layers, 8 KV heads, 128 dims)",
        ),
        ModelSpec(
            "qwen2.5-72b", layers=80, kv_heads=8, head_dim=128,
            source="Qwen/Qwen2.5-72B config.json (80 layers, 8 KV heads, hidden 8192 / 64 heads)",
        ),
        ModelSpec(
            "mistral-7b", layers=32, kv_heads=8, head_dim=128,
            source="mistralai/Mistral-7B-v0.1 config.json (32 layers, 8 KV heads, 128 dims)",
        ),
        ModelSpec(
            "deepseek-v3", layers=61, kv_heads=1, head_dim=576, kv_planes=1,
            source="deepseek-ai/DeepSeek-V3 config.json: MLA caches kv_lora_rank 512 + "
            "qk_rope_head_dim 64 = 576 values per token and layer",
        ),
    )
}


def model_spec(name: str) -> ModelSpec:
    """Look up a preset by name; the error lists the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(PRESETS))
        raise InputError("model", f"unknown model {name!r}; known: {known}") from None
