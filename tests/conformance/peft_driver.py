"""Make real PEFT LoRA adapters and peft's own merge of them (run with the mergekit venv's python,
which has peft and transformers; our venv has neither).

For each job: load the base model with transformers, wrap it with `get_peft_model` and the
job's LoraConfig, give every adapter parameter random values (seeded; a freshly initialised
adapter is a no-op, and a DoRA magnitude equal to the weight norm would hide the DoRA rescale),
and save the adapter with `save_pretrained`. Then, as a user would, load the base again, load
the saved adapter with `PeftModel.from_pretrained`, call `merge_and_unload()` and write the
merged model's state dict as one safetensors file: the expected values for mergesmith's
`MODEL+ADAPTER`.

Usage: python peft_driver.py JOBS_JSON
JOBS_JSON is a list of {"id", "arch" ("llama" or "gpt2"), "base", "adapter", "merged", "seed",
"dtype" ("float32" or "bfloat16"), "lora" (LoraConfig keyword arguments), "safetensors" (bool)}.
An "arch": "gpt2" job whose base folder does not exist first creates a tiny GPT-2 there (its
Conv1D layers are the ones `fan_in_fan_out` is for). Any failure stops the run with a traceback.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_gpt2(folder: Path, seed: int) -> None:
    """A tiny GPT-2 (hidden 16, 2 layers, 64 tokens) with tied embeddings, saved as
    transformers saves it."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(folder)


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Random values for every trainable (adapter) parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=g).to(param.dtype)
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * noise)
            elif "modules_to_save" in name:
                param.add_(0.05 * noise)
            else:
                param.copy_(0.2 * noise)


def run_job(job: dict) -> None:
    base = Path(job["base"])
    if job["arch"] == "gpt2" and not base.exists():
        make_gpt2(base, job["seed"])
    dtype = DTYPES[job.get("dtype", "float32")]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    config = LoraConfig(init_lora_weights=False, **job["lora"])
    peft_model = get_peft_model(model, config)
    randomise(peft_model, job["seed"])
    peft_model.save_pretrained(job["adapter"], safe_serialization=job.get("safetensors", True))

    fresh = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    merged = PeftModel.from_pretrained(fresh, job["adapter"]).merge_and_unload()
    state = {k: v.detach().clone().contiguous() for k, v in merged.state_dict().items()}
    save_file(state, job["merged"])


def main(jobs_path: str) -> None:
    warnings.simplefilter("ignore")  # peft's notes on fan_in_fan_out and saved embeddings
    jobs = json.loads(Path(jobs_path).read_text(encoding="utf-8"))
    for job in jobs:
        run_job(job)
        print(f"done {job['id']}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
