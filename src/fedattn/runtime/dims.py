"""A model's shapes, read once from its HF config.

Configs that omit ``head_dim`` imply hidden / heads; deriving that in one place keeps the frame
sizes a party checks, the cost model's predictions and the K/V it sends in agreement.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig


@dataclass(frozen=True)
class ModelDims:
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> ModelDims:
        return cls(
            num_layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            ffn=config.intermediate_size,
            vocab=config.vocab_size,
        )
