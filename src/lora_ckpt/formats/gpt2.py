"""GPT-2 as nanoGPT and as Hugging Face store it: same key names, ``Conv1D`` weights transposed.

nanoGPT's ``nn.Linear`` weights are (out, in); Hugging Face's GPT-2 keeps its four projections as
``Conv1D`` with weights (in, out). The token embedding is tied to ``lm_head`` in both; Hugging Face
files leave ``lm_head.weight`` out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from lora_ckpt.errors import KeyMismatchError, LayoutError

if TYPE_CHECKING:
    from lora_ckpt.io import PathLike
    from lora_ckpt.merge import Alpha
    from lora_ckpt.relayout import Relayout

__all__ = ["CONV1D", "hf_gpt2_config", "hf_to_nanogpt", "nanogpt_lora_to_peft", "nanogpt_to_hf", "peft_to_nanogpt_lora"]

#: The modules stored as ``Conv1D`` (weight (in, out)) in Hugging Face's GPT-2.
CONV1D = re.compile(r"^transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_BUFFERS = re.compile(r"\.attn\.(bias|masked_bias)$")


def nanogpt_to_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return a standard nanoGPT state dict as Hugging Face GPT-2 stores it (new transposed tensors).

    ``lm_head.weight`` is left out when it equals the token embedding (Hugging Face re-ties it); an
    untied head is kept, and needs ``tie_word_embeddings=False`` in the config.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if _BUFFERS.search(k):
            continue
        out[k] = v.T.contiguous() if CONV1D.match(k) else v
    head, wte = out.get("lm_head.weight"), out.get("transformer.wte.weight")
    if head is not None and wte is not None and (head is wte or torch.equal(head, wte)):
        del out["lm_head.weight"]
    return out


def hf_to_nanogpt(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return a Hugging Face GPT-2 state dict in nanoGPT's layout (Conv1D weights transposed, tied head added)."""
    sd = {k.removeprefix("base_model.model."): v for k, v in state_dict.items()}
    if "transformer.wte.weight" not in sd:
        raise KeyMismatchError("not a GPT-2 state dict: no transformer.wte.weight")
    n_embd = sd["transformer.wte.weight"].shape[-1]
    flipped = [k for k, v in sd.items() if CONV1D.match(k) and v.dim() == 2 and v.shape[0] != n_embd]
    if flipped:  # Conv1D weights are (in, out); only c_proj of the MLP takes 4 * n_embd inputs
        odd = [k for k in flipped if not k.endswith("mlp.c_proj.weight")]
        if odd:
            raise KeyMismatchError(
                f"{odd[0]}: shape {tuple(sd[odd[0]].shape)} is not Hugging Face GPT-2's Conv1D (in, out) with "
                f"in = n_embd = {n_embd}; the state dict looks like nanoGPT's layout already: drop gpt2=True (CLI: --gpt2)"
            )
    out = {k: (v.T.contiguous() if CONV1D.match(k) else v) for k, v in sd.items() if not _BUFFERS.search(k)}
    out.setdefault("lm_head.weight", out["transformer.wte.weight"])
    return out


def hf_gpt2_config(state_dict: Mapping[str, torch.Tensor], *, n_head: int, tied: bool = True) -> dict[str, Any]:
    """A ``GPT2Config`` dict for a nanoGPT state dict (nanoGPT's exact GELU, bias on, LayerNorm eps 1e-5)."""
    vocab, n_embd = state_dict["transformer.wte.weight"].shape
    if isinstance(n_head, bool) or not isinstance(n_head, int) or n_head <= 0 or n_embd % n_head:
        raise LayoutError(f"n_head={n_head!r} (CLI: --n-head) does not divide n_embd = {n_embd}; GPT-2's attention "
                          "splits n_embd into n_head equal heads: give the model's head count")
    n_layer = len({k.split(".")[2] for k in state_dict if k.startswith("transformer.h.")})
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": int(vocab),
        "n_positions": int(state_dict["transformer.wpe.weight"].shape[0]),
        "n_embd": int(n_embd),
        "n_layer": n_layer,
        "n_head": n_head,
        "activation_function": "gelu",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": tied,
    }


def nanogpt_lora_to_peft(
    state_dict: Mapping[str, torch.Tensor],
    base_dir: "PathLike",
    adapter_dir: "PathLike",
    *,
    alpha: "Alpha | None" = None,
    n_head: int,
    overwrite: bool = False,
    inputs: "Iterable[PathLike | None]" = (),
) -> None:
    """Write a nanoGPT LoRA checkpoint as a Hugging Face GPT-2 model folder plus a PEFT adapter folder.

    The adapter uses ``fan_in_fan_out=True`` (GPT-2's ``Conv1D``); per-module ranks and alphas go to
    ``rank_pattern`` / ``alpha_pattern``. ``transformers`` + ``peft`` then compute what the nanoGPT
    LoRA model computes. Both folders are written or neither; ``inputs`` are paths they may not overwrite.
    """
    import json

    from lora_ckpt.formats.hf import write_model_folder
    from lora_ckpt.formats.peft import write_peft_adapter
    from lora_ckpt.output import Output, write_together
    from lora_ckpt.relayout import convert_layout

    inputs = list(inputs)
    base_out = Output.prepare(base_dir, overwrite=overwrite, folder=True, inputs=inputs, siblings=[adapter_dir])
    adapter_out = Output.prepare(adapter_dir, overwrite=overwrite, folder=True, inputs=inputs, siblings=[base_dir])
    rel = convert_layout(state_dict, "peft", alpha=alpha)
    assert rel.base is not None
    hf = nanogpt_to_hf(rel.base)
    tied = "lm_head.weight" not in hf
    config = json.dumps(hf_gpt2_config(rel.base, n_head=n_head, tied=tied), indent=2)
    with write_together(base_out, adapter_out) as (base_tmp, adapter_tmp):
        write_model_folder(base_tmp, hf, files={"config.json": config})
        write_peft_adapter(adapter_tmp, rel.state_dict, alpha=rel.alpha, fan_in_fan_out=True)


def peft_to_nanogpt_lora(base: "PathLike | Mapping[str, torch.Tensor]", adapter_dir: "PathLike") -> "Relayout":
    """Return a PEFT adapter trained on Hugging Face GPT-2 as a nanoGPT LoRA state dict (``Relayout.alpha`` per module)."""
    from lora_ckpt.formats.hf import load_model_weights
    from lora_ckpt.formats.peft import load_peft_adapter
    from lora_ckpt.relayout import convert_layout

    base_sd = dict(base) if isinstance(base, Mapping) else load_model_weights(base)
    adapter = load_peft_adapter(adapter_dir)
    return convert_layout(
        adapter.state_dict, "nanogpt_lora", scales=adapter.scales, base=hf_to_nanogpt(base_sd),
        layout=adapter.layout, fan_in_fan_out=False,
    )
