"""Writes ``tests/data/pre_fused_export/``: a real export dir made by the code from before the fused
attention projections (separate q_proj/k_proj/v_proj), plus the logits that code computed.

It was run once at commit ca70ede (``git worktree add /tmp/old ca70ede``, then
``PYTHONPATH=/tmp/old python tests/data/make_pre_fused_export.py OUT``); with today's code it writes the
fused layout instead, so it is kept as the record of how the fixture was made, not rerun by the tests.
Small on purpose (d_model 32, vocabulary 64, fp32): about 250 KB.
"""

import json
import sys
from pathlib import Path

import torch

from pyramidion_ds.config import config_from_dict, save_resolved
from pyramidion_ds.data.spm import file_sha256, train_spm
from pyramidion_ds.generate.export import write_safetensors  # that commit's path; today pyramidion_ds.checkpoint.export
from pyramidion_ds.model import PyramidionModel

TEXT = (
    "The trial enrolled patients with chronic kidney disease. Blood pressure fell in the treated group. "
    "Adverse events were rare and mild. The authors conclude that the drug is safe and effective. "
    "Further studies should follow patients for longer periods of time."
)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    train_spm([TEXT] * 20, out, vocab_size=64, model_type="bpe")
    (out / "spm.vocab").unlink()
    cfg = config_from_dict(
        {
            "model": {
                "preset": "debug",
                "variant": "pyramidion",
                "d_model": 32,
                "num_heads": 4,
                "ffn_dim": 64,
                "vocab_size": 64,
                "dropout": 0.0,
                "pooling_schedule": [512, 128, 32],
            },
            "data": {"data": "unused"},
        }
    )
    torch.manual_seed(0)
    model = PyramidionModel(cfg.model).eval()
    state = model.state_dict()
    write_safetensors(out / "model.safetensors", state, torch.float32, metadata={"format": "pt"})
    save_resolved(cfg, out)
    (out / "export.json").write_text(
        json.dumps(
            {"tag": "fixture", "dtype": "fp32", "tensors": len(state), "spm_sha256": file_sha256(out / "spm.model")},
            indent=1,
        )
    )
    generator = torch.Generator().manual_seed(1)
    src = torch.randint(4, 64, (2, 300), generator=generator)
    src_lengths = torch.tensor([300, 170])
    src[1, 170:] = cfg.model.pad_id
    prev = torch.randint(4, 64, (2, 9), generator=generator)
    prev[:, 0] = cfg.model.eos_id
    with torch.no_grad():
        logits = model(src, src_lengths, prev)
    write_safetensors(
        out / "expected.safetensors",
        {"src_tokens": src, "src_lengths": src_lengths, "prev_output_tokens": prev, "logits": logits},
        torch.float32,
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
