"""The model runtime, the ground every stage stands on: `MoELayer`, one view over the MoE blocks of
every supported transformers family (`view`), and the modules compression and fine-tuning install
in a model: variable-width experts (`varwidth`, `varwidth_grad`), replaced experts (`replaced`),
rerouted routers (`routing`), plus the model fingerprint (`identity`) plans are checked against."""

from moetrim.model.view import MoELayer, ExpertWeights, find_moe_layers, routed_expert_param_count

__all__ = ["MoELayer", "ExpertWeights", "find_moe_layers", "routed_expert_param_count"]
