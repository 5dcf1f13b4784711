"""Run by tests/test_finetune.py under torchrun: shard a trained-looking student with FSDP2 on gloo, gather its
full state dict with the call accelerate makes under FSDP2, and save the model rank 0 rebuilds from it."""

import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer

from nirvana import register
from nirvana.core.params import FinetuneParams, defaults
from nirvana.method.surgery import save_model
from nirvana.recovery.finetune import rebuild, trainable


def student(folder: str, adapter: str) -> torch.nn.Module:
    register()  # the folder is pruned: transformers builds it at its recorded widths
    """The pruned model as `train` wraps it, every trainable weight moved as a training run would move it."""
    torch.manual_seed(1)  # LoRA's A matrices start random
    model = trainable(AutoModelForCausalLM.from_pretrained(folder), defaults(FinetuneParams, adapter=adapter))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def main(folder: str, adapter: str, out: str) -> None:
    dist.init_process_group("gloo")
    model = student(folder, adapter)
    config, dtype = model.config, model.dtype
    for layer in model.get_base_model().model.layers if adapter == "lora" else model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    sharded = type(next(model.parameters())).__name__
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if dist.get_rank() == 0:
        assert sharded == "DTensor", sharded
        rebuilt = rebuild(config, state, defaults(FinetuneParams, adapter=adapter), dtype)
        save_model(rebuilt, AutoTokenizer.from_pretrained(folder), out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
