"""Llama-family model, weight loading and tensor-parallel rewriting. Knows nothing of
sequence parallelism: attention is a callable supplied by the caller."""

from seqpar.model.config import ConfigError, ModelConfig, with_rope_scaling
from seqpar.model.hf import hf_model_from
from seqpar.model.llama import AttentionFn, LlamaForCausalLM
from seqpar.model.loader import checkpoint_dtype, load_config, load_model, load_tokenizer, resolve_model
from seqpar.model.parallel_layers import head_shard
from seqpar.model.parallelize import parallelize_head_sharded, parallelize_tp
from seqpar.model.reference import dense_causal_attention
from seqpar.model.weights import ModelLoadError

__all__ = [
    "AttentionFn",
    "checkpoint_dtype",
    "ConfigError",
    "LlamaForCausalLM",
    "ModelConfig",
    "ModelLoadError",
    "dense_causal_attention",
    "head_shard",
    "hf_model_from",
    "load_config",
    "load_model",
    "load_tokenizer",
    "parallelize_head_sharded",
    "parallelize_tp",
    "resolve_model",
    "with_rope_scaling",
]
