"""seqpar: exact sequence-parallel attention and long-context LLM inference."""

from seqpar.kernels.attention import attention_with_lse, reference_attention
from seqpar.kernels.layout import TokenLayout
from seqpar.kernels.merge import merge_states
from seqpar.sharding.plan import ShardPlan
from seqpar.strategies.api import STRATEGIES, sp_attention
from seqpar.strategies.decode import decode_attention
from seqpar.strategies.head_sharded import head_sharded_attention

__all__ = [
    "ShardPlan",
    "TokenLayout",
    "sp_attention",
    "STRATEGIES",
    "attention_with_lse",
    "reference_attention",
    "merge_states",
    "decode_attention",
    "head_sharded_attention",
]

from seqpar.engine.llm import LLM  # noqa: E402
from seqpar.engine.outputs import RequestOutput, StepRecord  # noqa: E402
from seqpar.engine.sampling_params import SamplingParams  # noqa: E402

__all__ += ["LLM", "SamplingParams", "RequestOutput", "StepRecord"]
