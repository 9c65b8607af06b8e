"""Which model families the vLLM plugin serves, and how each names and builds its MoE blocks.

No vLLM import here: the table is data (module and class names in vLLM, config keys, checkpoint names),
read by the config side (which only needs transformers) and by the model side (which imports vLLM).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moetrim.integrations.vllm_plugin.unpack import ExpertNames


class UnsupportedFamily(ValueError):
    """A variable-width checkpoint of a family the plugin has no vLLM model for."""


@dataclass(frozen=True)
class Family:
    """One family: vLLM's model file and MoE block, how that block learns its sizes, checkpoint names.

    style: how the block's constructor is told its sizes; "config" (a config object, rewritten per
    layer), "vllm_config" (reads vllm_config.model_config.hf_text_config) or "explicit" (num_experts,
    top_k, intermediate_size keyword arguments)."""

    model_type: str
    architecture: str  # vLLM's (and transformers') class name for the stock model
    module: str  # vllm.model_executor.models.<module>
    block: str  # MoE block class in that module
    style: str
    width_key: str = "moe_intermediate_size"
    count_key: str = "num_experts"
    top_k_key: str = "num_experts_per_tok"
    names: ExpertNames = field(default_factory=ExpertNames)
    rename: tuple[tuple[str, str], ...] = ()  # checkpoint -> vLLM name substrings (non-expert tensors)

    @property
    def plugin_architecture(self) -> str:
        return "MoetrimVarwidth" + self.architecture


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("qwen2_moe", "Qwen2MoeForCausalLM", "qwen2_moe", "Qwen2MoeSparseMoeBlock", "config"),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe", "Qwen3MoeSparseMoeBlock", "vllm_config"),
    Family("olmoe", "OlmoeForCausalLM", "olmoe", "OlmoeMoE", "explicit", width_key="intermediate_size"),
    Family("mixtral", "MixtralForCausalLM", "mixtral", "MixtralMoE", "explicit", width_key="intermediate_size",
           count_key="num_local_experts", names=ExpertNames("block_sparse_moe", "w1", "w3", "w2"),
           rename=((".mlp.gate.", ".block_sparse_moe.gate."),)),
    Family("deepseek_v2", "DeepseekV2ForCausalLM", "deepseek_v2", "DeepseekV2MoE", "config", count_key="n_routed_experts"),
    Family("deepseek_v3", "DeepseekV3ForCausalLM", "deepseek_v2", "DeepseekV2MoE", "config", count_key="n_routed_experts"),
)}


def family(model_type: object) -> Family:
    """The plugin's entry for a base model type, or one clear error naming what is supported."""
    if isinstance(model_type, str) and model_type in FAMILIES:
        return FAMILIES[model_type]
    raise UnsupportedFamily(f"moetrim's vLLM plugin cannot serve variable-width '{model_type}' checkpoints; "
                            f"it serves {', '.join(FAMILIES)}")
