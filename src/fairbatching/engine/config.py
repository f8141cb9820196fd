"""Model architecture of a Llama-family decoder (Llama 2/3, Mistral, Qwen2): presets or a HF config.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from fairbatching.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    head_dim: int = 0
    # Llama 3.1 "llama3" RoPE frequency scaling: (factor, low_freq_factor, high_freq_factor, original_max_position).
    rope_llama3_scaling: tuple[float, float, float, int] | None = None

    def __post_init__(self) -> None:
        for field_name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
            if getattr(self, field_name) <= 0:
                raise ConfigError(
                    f"model {self.name!r}: {field_name} must be positive, got {getattr(self, field_name)}"
                )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model {self.name!r}: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if not self.head_dim:
            if self.hidden_size % self.num_heads:
                raise ConfigError(f"model {self.name!r}: hidden_size is not a multiple of num_heads")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise ConfigError(f"model {self.name!r}: RoPE needs an even head_dim, got {self.head_dim}")

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers, at 2 bytes per value."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2

    @property
    def num_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attn = h * (self.num_heads + 2 * self.num_kv_heads) * d + self.num_heads * d * h
        mlp = 3 * h * self.intermediate_size
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + 2 * h) + embed + h

    def with_layers(self, num_layers: int) -> ModelConfig:
        """The same shape sliced to fewer layers (a 70B-layer slice, a quick test)."""
        return replace(self, name=f"{self.name}-{num_layers}l", num_layers=num_layers)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf_config(cls, cfg: dict, name: str = "checkpoint") -> ModelConfig:
        """Read a Hugging Face ``config.json`` dict; unsupported architectures get an error naming them."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{name}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        # transformers < 5 writes rope_theta and rope_scaling; 5.x writes both into rope_parameters.
        scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or None
        llama3 = None
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "llama3":
                llama3 = (
                    float(scaling["factor"]),
                    float(scaling["low_freq_factor"]),
                    float(scaling["high_freq_factor"]),
                    int(scaling["original_max_position_embeddings"]),
                )
            elif kind not in ("default", None):
                raise ConfigError(f"{name}: rope_scaling type {kind!r} is not supported (only 'llama3')")
        if cfg.get("use_sliding_window"):
            raise ConfigError(f"{name}: sliding-window attention is not supported")
        try:
            return cls(
                name=name,
                hidden_size=int(cfg["hidden_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=int(cfg["num_attention_heads"]),
                num_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
                intermediate_size=int(cfg["intermediate_size"]),
                vocab_size=int(cfg["vocab_size"]),
                rope_theta=float(cfg.get("rope_theta") or (scaling or {}).get("rope_theta", 10000.0)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
                head_dim=int(cfg.get("head_dim") or 0),
                rope_llama3_scaling=llama3,
            )
        except KeyError as exc:
            raise ConfigError(f"{name}: config.json lacks {exc.args[0]!r}") from None

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        file = path / "config.json"
        if not file.is_file():
            raise ConfigError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
        try:
            cfg = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{file}: invalid JSON ({exc})") from None
        return cls.from_hf_config(cfg, name=path.name)


PRESETS: dict[str, ModelConfig] = {
    "llama-3-8b": ModelConfig("llama-3-8b", 4096, 32, 32, 8, 14336, 128256, max_position_embeddings=131072),
    "llama-3.2-1b": ModelConfig(
        "llama-3.2-1b", 2048, 16, 32, 8, 8192, 128256, tie_word_embeddings=True, max_position_embeddings=131072
    ),
    "llama-3-70b": ModelConfig("llama-3-70b", 8192, 80, 64, 8, 28672, 128256, max_position_embeddings=131072),
    "tiny": ModelConfig("tiny", 64, 2, 4, 2, 128, 256, rope_theta=10000.0, max_position_embeddings=4096),
}


def check_engine_sizes(num_blocks: int | None, block_size: int, max_context: int) -> None:
    """The engine's sizes, checked before anything is built: a bad one otherwise fails deep in the engine's start
    (a division by zero) or once its replay begins. Any block size >= 1 serves: the kernels address the cache by
    flat slot (block * block_size + offset), so none needs a power of two."""
    if num_blocks is not None and num_blocks < 2:
        raise ConfigError(f"--num-blocks {num_blocks}: must be >= 2 (block 0 is the engine's scratch block)")
    if block_size < 1:
        raise ConfigError(f"--block-size {block_size}: must be >= 1 (tokens per KV block)")
    if max_context < 2:
        raise ConfigError(f"--max-context {max_context}: must be >= 2 (a prompt token and an output token)")


def model_config(name_or_path: str) -> ModelConfig:
    """A preset name, or a checkpoint directory with a config.json."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if path.is_dir():
        return ModelConfig.from_dir(path)
    base, _, layers = name_or_path.rpartition("@")
    if base in PRESETS and layers.isdigit():
        return PRESETS[base].with_layers(int(layers))
    raise ConfigError(
        f"unknown model {name_or_path!r}: use a preset ({', '.join(PRESETS)}), 'preset@LAYERS' for a layer slice, "
        "or a local checkpoint directory"
    )
