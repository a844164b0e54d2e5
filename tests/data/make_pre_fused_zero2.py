"""Writes ``tests/data/pre_fused_zero2/old/``: a real ZeRO-2 DeepSpeed checkpoint of the pre-fusion export
``tests/data/pre_fused_export``, saved by the code from before the fused attention projections.

Run once at commit ca70ede in one CPU process (``PYTHONPATH=/tmp/old python
tests/data/make_pre_fused_zero2.py tests/data/pre_fused_export OUT``); only ``mp_rank_00_model_states.pt``
(parameter names and shapes, 240 KB) is kept: the optimizer shard is not needed to recognise the layout.
"""

import os
import sys

import torch

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29561", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
from pathlib import Path

import deepspeed
from safetensors.torch import load_file

from pyramidion_ds.generate.export import _run_config  # that commit's path; today pyramidion_ds.checkpoint.export
from pyramidion_ds.model import PyramidionModel

fixture = Path(sys.argv[1])
out = Path(sys.argv[2])
deepspeed.init_distributed(dist_backend="gloo")
model = PyramidionModel(_run_config(fixture).model)
model.load_state_dict(load_file(str(fixture / "model.safetensors")), strict=False)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2}}
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
engine.save_checkpoint(str(out), tag="old")
