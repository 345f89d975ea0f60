"""Model hyper-parameters: one frozen, validated record built from HF or GGUF metadata."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

# HF `model_type` -> our architecture name. SmolLM2 ships as model_type "llama".
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
_HF_CLASS_TO_ARCH = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
}
_HF_MODEL_TYPES = {"gemma3_text": "gemma3"}
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
# llama.cpp calls Mistral "llama"; the GGUF tensor layout is the same.
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")
# "freq_factors" is llama.cpp's way of storing llama3 scaling: a per-frequency
# divisor tensor (`rope_freqs.weight`) instead of the four llama3 numbers.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "freq_factors")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_YARN_KEYS = (
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "attention_factor",
    "mscale",
    "mscale_all_dim",
    "truncate",
)


class ConfigError(ValueError):
    """A model configuration this library cannot run, with what would work."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v (Qwen2; Llama with attention_bias=True)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    architecture: str
    o_proj_bias: bool = False  # Llama's attention_bias=True also biases o_proj; Qwen2's does not
    qk_norm: bool = False  # Qwen3: an RMSNorm over each q and k head before RoPE
    hidden_act: str = "silu"  # the MLP's gate activation: silu (SwiGLU) or gelu_pytorch_tanh (Gemma 3)
    # Sliding-window attention: the layers of type "sliding_attention" see the keys at positions
    # (p - sliding_window, p] from a query at p (transformers' rule); () = every layer global.
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    local_rope_theta: float | None = None  # Gemma 3: the sliding layers' RoPE base (no scaling); else the global
    query_pre_attn_scalar: float | None = None  # Gemma 3: softmax scale = this ** -0.5 (else head_dim ** -0.5)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_types", tuple(self.layer_types))  # hashable, whatever the caller gave
        if self.rope_scaling is not None:  # own copy: the caller's dict must not alias a frozen config
            object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention"
            )
        if self.head_dim % 2 != 0:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ConfigError(f"rms_norm_eps must be a positive finite float, got {self.rms_norm_eps!r}")
        if not (self.rope_theta > 1 and math.isfinite(self.rope_theta)):
            raise ConfigError(f"rope_theta must be a finite float > 1, got {self.rope_theta!r}")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architecture {self.architecture!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if not isinstance(self.eos_token_ids, tuple):
            raise ConfigError(f"eos_token_ids must be a tuple, got {type(self.eos_token_ids).__name__}")
        for tok in (*self.eos_token_ids, *([] if self.bos_token_id is None else [self.bos_token_id])):
            if not 0 <= tok < self.vocab_size:
                raise ConfigError(f"special token id {tok} is outside the vocabulary [0, {self.vocab_size})")
        _validate_rope_scaling(self.rope_scaling, self.head_dim)
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"hidden_act {self.hidden_act!r} is not supported; supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        if self.layer_types:
            if len(self.layer_types) != self.num_layers:
                raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
            unknown = sorted(set(self.layer_types) - {"sliding_attention", "full_attention"})
            if unknown:
                raise ConfigError(
                    f"layer types {unknown} are not supported; supported: sliding_attention, full_attention"
                )
            if "sliding_attention" in self.layer_types and not (
                isinstance(self.sliding_window, int) and self.sliding_window > 0
            ):
                raise ConfigError(
                    f"sliding_attention layers need a positive sliding_window, got {self.sliding_window!r}"
                )

    def window(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (keys at positions (p - window, p]), None if global."""
        if self.layer_types and self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    @property
    def windowed(self) -> bool:
        """Whether any layer attends through a sliding window."""
        return "sliding_attention" in self.layer_types

    @property
    def attention_scale(self) -> float:
        """The softmax scale of every layer."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def __hash__(self) -> int:
        # Kept as a plain dict (picklable, JSON-like), so hash rope_scaling by its items.
        scaling = None if self.rope_scaling is None else tuple(sorted(self.rope_scaling.items()))
        return hash(tuple(scaling if f.name == "rope_scaling" else getattr(self, f.name) for f in fields(self)))

    @property
    def group_size(self) -> int:
        """Query heads sharing one KV head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """From a HF `config.json` dict (transformers 4.x or 5.x rope layout)."""
        arch = _hf_architecture(hf)
        act = hf.get("hidden_activation" if arch == "gemma3" else "hidden_act") or hf.get("hidden_act", "silu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"hidden_act {act!r} is not supported; supported: {', '.join(SUPPORTED_ACTIVATIONS)}")
        if hf.get("mlp_bias", False):
            raise ConfigError("mlp_bias=True is not supported; Llama/Qwen2/Qwen3/Mistral/Gemma 3 checkpoints have none")
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if hf.get(key) is not None:
                raise ConfigError(f"{key}={hf[key]} (Gemma 2's soft-capping) is not supported; Gemma 3 has none")
        if hf.get("use_bidirectional_attention"):
            raise ConfigError("use_bidirectional_attention (an embedding model) is not supported: seqpar is causal")
        window = hf.get("sliding_window")
        layer_types = tuple(hf.get("layer_types") or ())
        if arch == "gemma3" and not layer_types:  # older configs: every n-th layer global
            n = int(hf.get("sliding_window_pattern", 6))
            layer_types = tuple(
                "sliding_attention" if (i + 1) % n else "full_attention" for i in range(hf["num_hidden_layers"])
            )
        elif not layer_types and window is not None and hf.get("use_sliding_window", arch == "mistral"):
            # Mistral: every layer; Qwen2/3 with use_sliding_window: the layers from max_window_layers on
            first = int(hf.get("max_window_layers", 0)) if arch != "mistral" else 0
            layer_types = tuple(
                "sliding_attention" if i >= first else "full_attention" for i in range(hf["num_hidden_layers"])
            )
        if arch in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
            layer_types = ()  # the window is off whatever the layer types say (transformers' rule)
        if "sliding_attention" not in layer_types:
            layer_types, window = (), None
        # transformers 5 folds rope_theta into `rope_parameters` (Gemma 3: one per layer type); 4.x has
        # rope_theta + rope_scaling (Gemma 3: + rope_local_base_freq).
        params = dict(hf.get("rope_parameters") or {})
        local_theta = None
        if arch == "gemma3":
            local = dict(params.get("sliding_attention") or {})
            if local.get("rope_type", "default") != "default":
                raise ConfigError("Gemma 3's sliding layers take default RoPE; this config scales them")
            local_theta = float(local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0)))
            params = dict(params.get("full_attention") or {})
            params.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
        rope = dict(params or hf.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        rope_scaling = None if rope_type == "default" else {"rope_type": rope_type, **rope}
        if rope_scaling is not None and rope_type in ("llama3", "yarn"):
            rope_scaling.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
        num_heads = hf["num_attention_heads"]
        bias = bool(hf.get("attention_bias", arch == "qwen2"))
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=hf["max_position_embeddings"],
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", arch == "gemma3")),
            attention_bias=bias,
            o_proj_bias=bias and arch != "qwen2",
            qk_norm=arch in ("qwen3", "gemma3"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_as_id_tuple(hf.get("eos_token_id")),
            architecture=arch,
            hidden_act=act,
            sliding_window=window,
            layer_types=layer_types,
            local_rope_theta=local_theta,
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar") if arch == "gemma3" else None,
        )

    @classmethod
    def from_gguf(
        cls,
        metadata: Mapping[str, Any],
        tensor_shapes: Mapping[str, tuple[int, ...]],
        rope_freqs: Sequence[float] | None = None,
    ) -> ModelConfig:
        """From GGUF key/values and tensor shapes (torch order, e.g. token_embd [vocab, hidden]).

        The shapes are needed because llama.cpp encodes facts as tensors: tied embeddings by a
        missing `output.weight`, llama3 rope scaling by `rope_freqs.weight` (whose values the
        caller passes as `rope_freqs`).
        """
        arch = metadata.get("general.architecture")
        if arch not in SUPPORTED_GGUF_ARCHITECTURES:
            raise ConfigError(
                f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
            )

        def get(key: str, default: Any = None) -> Any:
            full = f"{arch}.{key}"
            if full not in metadata and default is None:
                raise ConfigError(f"GGUF metadata lacks required key {full!r}")
            return metadata.get(full, default)

        hidden, num_heads = int(get("embedding_length")), int(get("attention.head_count"))
        if "token_embd.weight" not in tensor_shapes:
            raise ConfigError("GGUF file has no token_embd.weight tensor")
        vocab = int(metadata.get(f"{arch}.vocab_size", tensor_shapes["token_embd.weight"][0]))
        scaling_type = metadata.get(f"{arch}.rope.scaling.type", "none")
        rope_scaling: dict[str, Any] | None = None
        if "rope_freqs.weight" in tensor_shapes:
            if rope_freqs is None:
                raise ConfigError("GGUF has a rope_freqs.weight tensor: pass its values as rope_freqs")
            rope_scaling = {"rope_type": "freq_factors", "factors": tuple(float(f) for f in rope_freqs)}
        elif scaling_type == "linear":
            rope_scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        elif scaling_type not in ("none", ""):
            raise ConfigError(
                f"GGUF rope scaling {scaling_type!r} is not supported; supported: none, linear, llama3 (rope_freqs)"
            )
        eos = [metadata.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
        head_dim = int(get("attention.key_length", hidden // num_heads))
        gemma: dict[str, Any] = {}
        if arch == "gemma3":
            layers = int(get("block_count"))
            # What llama.cpp assumes and its converter does not store: every 6th layer global, the
            # sliding layers' RoPE base 10000, the softmax scale head_dim ** -0.5 (hidden / heads in
            # the 62-layer 27B).
            window = metadata.get(f"{arch}.attention.sliding_window")
            types = tuple("sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers))
            gemma = dict(
                hidden_act="gelu_pytorch_tanh",
                sliding_window=None if window is None else int(window),
                layer_types=types if window is not None else (),
                local_rope_theta=10000.0,
                query_pre_attn_scalar=float(hidden // num_heads if layers == 62 else head_dim),
            )
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(get("attention.head_count_kv", num_heads)),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(get("context_length")),
            tie_word_embeddings="output.weight" not in tensor_shapes,
            attention_bias="blk.0.attn_q.bias" in tensor_shapes,
            o_proj_bias="blk.0.attn_output.bias" in tensor_shapes,
            # By architecture, not by tensor: a qwen3 file without the norms is then a missing-key error.
            qk_norm=arch in ("qwen3", "gemma3"),
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
            architecture=arch,
            **gemma,
        )


def with_rope_scaling(config: ModelConfig, scaling: Mapping[str, Any] | None) -> ModelConfig:
    """`config` with its RoPE scaling replaced by `scaling` (HF's `rope_scaling` dict, as vLLM's
    `--rope-scaling` / `hf_overrides`); None leaves it as it is.

    As vLLM does, the context grows by the factor: linear and yarn reach
    `original_max_position_embeddings * factor` (the original defaults to the model's context).
    llama3 keeps the model's context: its checkpoints already state the extended one.
    """
    if scaling is None:
        return config
    scaling = dict(scaling)
    if "type" in scaling and "rope_type" not in scaling:  # transformers 4.x spelling
        scaling["rope_type"] = scaling.pop("type")
    kind = scaling.get("rope_type")
    if kind == "default":
        return replace(config, rope_scaling=None)
    if kind == "dynamic":
        raise ConfigError(
            "dynamic NTK rope scaling is not supported: transformers recomputes its frequencies "
            "from the longest sequence seen so far, so a cached key's angle depends on what ran "
            "before it; use 'yarn' or 'linear' (exact at every position)"
        )
    if kind in ("linear", "yarn", "llama3"):
        scaling.setdefault("original_max_position_embeddings", config.max_position_embeddings)
    context = config.max_position_embeddings
    factor = scaling.get("factor")
    if kind in ("linear", "yarn") and isinstance(factor, (int, float)) and factor > 0:
        context = max(context, int(scaling["original_max_position_embeddings"] * factor))
    return replace(config, rope_scaling=scaling, max_position_embeddings=context)


def _hf_architecture(hf: Mapping[str, Any]) -> str:
    model_type = hf.get("model_type")
    if model_type == "gemma3":
        raise ConfigError(
            "a gemma3 (image-text) checkpoint: seqpar serves the text model; load one saved as Gemma3ForCausalLM "
            "(model_type gemma3_text: the 1B checkpoint, or the text part saved alone)"
        )
    if model_type in _HF_MODEL_TYPES:
        return _HF_MODEL_TYPES[model_type]
    if model_type in SUPPORTED_ARCHITECTURES:
        return model_type
    for cls_name in hf.get("architectures") or []:
        if cls_name in _HF_CLASS_TO_ARCH:
            return _HF_CLASS_TO_ARCH[cls_name]
    named = model_type or (hf.get("architectures") or ["<none>"])[0]
    raise ConfigError(
        f"architecture {named!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)} (SmolLM2 is llama)"
    )


def _as_id_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _validate_rope_scaling(scaling: dict[str, Any] | None, head_dim: int) -> None:
    if scaling is None:
        return
    kind = scaling.get("rope_type")
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"rope scaling type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)} (or None)"
        )
    if kind in ("linear", "llama3", "yarn") and not scaling.get("factor", 0) > 0:
        raise ConfigError(f"{kind} rope scaling needs a positive 'factor', got {scaling.get('factor')!r}")
    if kind == "llama3":
        missing = [k for k in _LLAMA3_KEYS if k not in scaling]
        if missing:
            raise ConfigError(f"llama3 rope scaling lacks {missing}; it needs {list(_LLAMA3_KEYS)}")
        if not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
            raise ConfigError(
                "llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
                f"{scaling['high_freq_factor']} <= {scaling['low_freq_factor']}"
            )
    if kind == "yarn":
        unknown = sorted(set(scaling) - {"rope_type", *_YARN_KEYS})
        if unknown or "original_max_position_embeddings" not in scaling:
            raise ConfigError(
                f"yarn rope scaling needs 'factor' and 'original_max_position_embeddings' and takes "
                f"only {list(_YARN_KEYS)}; got unknown keys {unknown}"
                if unknown
                else "yarn rope scaling needs 'original_max_position_embeddings' (the trained context)"
            )
    if kind == "freq_factors":
        factors = scaling.get("factors")
        if factors is None or len(factors) != head_dim // 2:
            raise ConfigError(
                f"rope freq_factors needs 'factors' with head_dim // 2 entries, got "
                f"{None if factors is None else len(factors)}, expected "
                f"head_dim // 2 = {head_dim // 2}"
            )
