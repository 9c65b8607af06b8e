"""Uniform view over the MoE layers of `transformers` models, and the variable-width experts module."""

from moetrim.model.view import MoELayer, ExpertWeights, find_moe_layers, routed_expert_param_count

__all__ = ["MoELayer", "ExpertWeights", "find_moe_layers", "routed_expert_param_count"]
