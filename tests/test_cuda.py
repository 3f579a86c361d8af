"""CUDA: merging where the tensors live. Skipped without a GPU (CI has none)."""

import pytest
import torch

from lora_ckpt import load_into, merge_lora, merged_state_dict
from lora_ckpt.testing import assert_state_dict_close, make_gpt, make_lora_state_dict

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_on_cuda_matches_cpu(dtype):
    sd = {k: v.to(dtype) for k, v in make_lora_state_dict(rank=8, wte_rank=4).items()}
    cpu = merge_lora(sd, alpha=16.0)
    gpu = merge_lora({k: v.cuda() for k, v in sd.items()}, alpha=16.0)
    assert all(v.device.type == "cuda" for v in gpu.values())
    # fp32: the kernels sum in another order; bf16: one rounding each, so at most one ulp apart
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-5}
    assert_state_dict_close({k: v.cpu() for k, v in gpu.items()}, cpu, **tol)


def test_cpu_checkpoint_into_cuda_model_and_merged_state_dict_back_on_cpu():
    lora = make_gpt(attn_rank=4, randomize=True).cuda()
    plain = make_gpt(seed=3).cuda()
    load_into(plain, {k: v.cpu() for k, v in lora.state_dict().items()}, alpha=16.0)
    torch.testing.assert_close(logits_on(plain), logits_on(lora))
    out = merged_state_dict(lora)
    assert all(v.device.type == "cpu" for v in out.values())


def logits_on(model):
    with torch.no_grad():
        return model(torch.arange(8, device="cuda").view(1, 8))

