"""Run under the DeepSpeed launcher: resume a ZeRO-3 run dir, gather every parameter, save them on rank 0.

deepspeed --num_gpus 2 tests/integration/gather_zero3.py CONFIG.yaml OUT.pt
"""

import sys

import deepspeed
import torch
import torch.distributed as dist

from pyramidion_ds.config import load_config
from pyramidion_ds.distributed import init_distributed
from pyramidion_ds.train import Trainer

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
cfg = load_config(args[0])
world = init_distributed()
trainer = Trainer(cfg, world)
trainer.setup()
params = dict(trainer.model.named_parameters())
gathered = {}
with deepspeed.zero.GatheredParameters(list(params.values())):
    if dist.get_rank() == 0:
        gathered = {name: p.detach().clone().float() for name, p in params.items()}
if dist.get_rank() == 0:
    torch.save({"update": trainer.update, "params": gathered}, args[1])
dist.barrier()
