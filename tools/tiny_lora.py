"""Build a tiny LoRA adapter for the tiny model (tools/tiny_model.py), by hand, in PEFT's format.

No `peft` needed: an adapter is a folder with `adapter_config.json` and `adapter_model.safetensors`
whose keys are `base_model.model.model.layers.{i}.self_attn.{q_proj,v_proj}.lora_{A,B}.weight`
(FIELD_NOTES section 10). The A and B matrices are random but seeded, and both non-zero: PEFT's own
initialisation sets B to zero, which changes nothing, and an adapter that changes nothing cannot
show that it is applied.

    python -m tools.tiny_lora build/tiny-llama build/lora/tiny-lora-a [--rank 8] [--seed 1]
"""

import json
import sys
from pathlib import Path

# The projections the adapter changes. Their shapes follow the base model's config.
TARGET_MODULES = ("q_proj", "v_proj")


def build(base_model_dir, target, *, rank: int = 8, seed: int = 1, base_model_name: str = "",
          scale: float = 0.5):
    """Write an adapter for the model in `base_model_dir` into `target`; return its path.

    `base_model_name` goes into adapter_config.json as `base_model_name_or_path` (vLLM's filesystem
    resolver loads an adapter only when it equals the served model's id); default: the model folder.
    `scale` is the weights' standard deviation: large enough that greedy tokens change.
    """
    import torch
    from safetensors.torch import save_file

    config = json.loads((Path(base_model_dir) / "config.json").read_text())
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    out_features = {"q_proj": config["num_attention_heads"] * head_dim,
                    "v_proj": config["num_key_value_heads"] * head_dim}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module in TARGET_MODULES:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator) * scale
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features[module], rank, generator=generator) * scale
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.to(torch.bfloat16).contiguous() for name, tensor in tensors.items()},
              str(target / "adapter_model.safetensors"))
    (target / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name or str(base_model_dir),
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(TARGET_MODULES),
        "fan_in_fan_out": False,
        "inference_mode": True,
    }, indent=2))
    return target


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base_model_dir")
    parser.add_argument("target")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parsed = parser.parse_args()
    print(build(parsed.base_model_dir, parsed.target, rank=parsed.rank, seed=parsed.seed))
