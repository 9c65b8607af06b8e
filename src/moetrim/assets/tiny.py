"""Tiny random-weight MoE models of every supported family, built from real `transformers` configs.

Used by the tests and for trying moetrim without a checkpoint: `moetrim.assets.tiny.save_tiny(family, dir)`
writes a real checkpoint directory (config, safetensors, a small tokenizer) that every command loads
through the ordinary `from_pretrained` path.
"""

from __future__ import annotations

from pathlib import Path

import torch

_BASE = dict(
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    bos_token_id=127,
    eos_token_id=127,
    pad_token_id=127,
)
_MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)

TINY_CONFIGS: dict[str, dict] = {
    "qwen2_moe": dict(
        moe_intermediate_size=32, shared_expert_intermediate_size=48, intermediate_size=96,
        num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[1],
    ),
    "qwen3_moe": dict(moe_intermediate_size=32, intermediate_size=96, num_experts=8, num_experts_per_tok=2, head_dim=16),
    "mixtral": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    "olmoe": dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
    "deepseek_v2": dict(
        **_MLA, q_lora_rank=None, moe_intermediate_size=32, intermediate_size=96, n_routed_experts=8,
        n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1,
    ),
    "deepseek_v3": dict(
        **_MLA, q_lora_rank=16, moe_intermediate_size=32, intermediate_size=96, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
        routed_scaling_factor=2.5,
    ),
    "gpt_oss": dict(
        intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=16,
        max_position_embeddings=131072,
    ),
}
FAMILIES = tuple(TINY_CONFIGS)


def tiny_config(family: str, **overrides):
    from transformers import AutoConfig

    if family not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny family '{family}'; choose from {', '.join(FAMILIES)}")
    kwargs = {**_BASE, **TINY_CONFIGS[family], **overrides}
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A random-weight causal LM of `family`. Router and correction-bias weights are made
    non-trivial so routing depends on the input (random init leaves some of them at zero)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.08)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
    model.eval()
    return model


def tiny_tokenizer(vocab_size: int = 128):
    """A byte-level tokenizer that fits the tiny vocabulary (bytes 0..vocab-2, one end-of-text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i) if 32 <= i < 127 else f"<0x{i:02X}>": i for i in range(vocab_size - 1)}
    vocab["<|endoftext|>"] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="?"
    )


def save_tiny(family: str, out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """Write a tiny checkpoint directory (what `from_pretrained` expects) and return its path."""
    out = Path(out_dir)
    model = tiny_model(family, seed=seed, dtype=dtype, **overrides)
    model.save_pretrained(out)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(out)
    return out
