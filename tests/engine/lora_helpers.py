"""LoRA test helpers: PEFT adapters with random nonzero A and B written to disk, and HF + PEFT greedy references."""

from __future__ import annotations

from pathlib import Path

import torch

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapter(base_path: str, out_dir: Path, rank: int, seed: int, targets=ALL_TARGETS,
                 alpha: float | None = None, use_rslora: bool = False, std: float = 0.05) -> str:
    """Write a PEFT LoRA adapter for the checkpoint at ``base_path`` with random A and B (PEFT inits B to zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / "adapter_model.safetensors").exists():
        return str(out_dir)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, target_modules=list(targets),
                     lora_dropout=0.0, use_rslora=use_rslora, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    peft_model.save_pretrained(str(out_dir))
    return str(out_dir)


def peft_greedy(base_path: str, adapter_dir: str | None, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """HF ``generate(do_sample=False)`` with the PEFT adapter applied (None: the base), per prompt, unpadded."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, pad_token_id=0, eos_token_id=2)
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
        out.append(gen[0, len(p):].tolist())
    return out
