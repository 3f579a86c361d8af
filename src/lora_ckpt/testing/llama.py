"""A deterministic synthetic Llama-style checkpoint (sharded safetensors) and a PEFT adapter for it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from lora_ckpt.streaming.writer import plan_shards

__all__ = ["LlamaShape", "write_llama_adapter", "write_llama_checkpoint"]

_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class LlamaShape:
    """Sizes of a Llama-style model (no grouped-query attention: k/v are as wide as q)."""

    hidden: int = 64
    intermediate: int = 172
    layers: int = 2
    vocab: int = 128

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i = self.hidden, self.intermediate
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
            out += [(p + f"self_attn.{x}.weight", (h, h)) for x in ("q_proj", "k_proj", "v_proj", "o_proj")]
            out += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)), (p + "mlp.down_proj.weight", (h, i))]
        return out + [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]

    def nbytes(self, dtype: torch.dtype) -> int:
        return sum(torch.Size(s).numel() for _, s in self.tensors()) * dtype.itemsize

    def config(self) -> dict[str, object]:
        return {
            "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers, "num_attention_heads": max(1, self.hidden // 64),
            "num_key_value_heads": max(1, self.hidden // 64), "vocab_size": self.vocab, "tie_word_embeddings": False,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 256, "bos_token_id": 0, "eos_token_id": 0,
        }


def write_llama_checkpoint(
    folder: str | Path, shape: LlamaShape, *, dtype: torch.dtype = torch.bfloat16, shard_bytes: int = 1 << 30, seed: int = 0
) -> Path:
    """Write a Hugging Face-style sharded safetensors checkpoint (index, ``config.json``); returns the folder.

    Values are seeded normals (0.02 std), generated one tensor at a time, so memory stays near one shard.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    plan = plan_shards([(name, torch.Size(s).numel() * dtype.itemsize) for name, s in shape.tensors()], shard_bytes)
    total = len(plan)
    weight_map = {}
    dims = dict(shape.tensors())
    for i, names in enumerate(plan):
        fname = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight") or "layernorm" in name:
                tensors[name] = torch.ones(dims[name], dtype=dtype)
            else:
                tensors[name] = (torch.randn(dims[name], generator=g) * 0.02).to(dtype)
            weight_map[name] = fname
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": shape.nbytes(dtype)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps({**shape.config(), "torch_dtype": str(dtype).removeprefix("torch.")}, indent=2))
    return out


def write_llama_adapter(
    folder: str | Path, shape: LlamaShape, *, rank: int = 16, alpha: float = 32.0, dtype: torch.dtype = torch.bfloat16, seed: int = 1
) -> Path:
    """Write a PEFT LoRA adapter for every q/k/v/o and MLP projection (random non-zero A and B)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    dims = dict(shape.tensors())
    tensors = {}
    for n in range(shape.layers):
        for proj in _PROJECTIONS:
            name = f"model.layers.{n}.{proj}"
            rows, cols = dims[f"{name}.weight"]
            tensors[f"base_model.model.{name}.lora_A.weight"] = (torch.randn(rank, cols, generator=g) / cols**0.5).to(dtype)
            tensors[f"base_model.model.{name}.lora_B.weight"] = (torch.randn(rows, rank, generator=g) * 0.01).to(dtype)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": sorted({p.split(".")[-1] for p in _PROJECTIONS}),
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
              "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "inference_mode": True}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out
