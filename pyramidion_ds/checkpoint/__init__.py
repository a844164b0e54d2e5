"""The checkpoint format, shared by training (which writes and resumes it) and generation (which reads it).

    manifest.py     a run's checkpoints/: tags, manifest.json with every file's size + sha256, latest, best,
                    pruning; CheckpointDir / CheckpointInfo; stale_layout_problem (pre-fusion checkpoints)
    safe_load.py    safe_torch_load: weights-only unpickling with an allow-list (safe_globals); CheckpointError
    files.py        our DeepSpeed checkpoint engine: hashes each file while writing it, records a full disk
    consolidate.py  full fp32 weights from ZeRO shards of any stage and world size
    export.py       run dir -> export dir (safetensors + config + spm), load_export (never unpickles)
    weights.py      --train.init_from: weights from a run dir or an export dir, checked before loading
    universal.py    a resume on another world size / ZeRO stage: DeepSpeed's universal checkpoint, converted
                    next to the checkpoint under its own manifest, loaded without unsafe unpickling

It imports nothing from ``train/``, ``generate/`` or ``cli/``.
"""

from .manifest import CheckpointDir, CheckpointInfo, tag_for
from .safe_load import CheckpointError

__all__ = ["CheckpointDir", "CheckpointError", "CheckpointInfo", "tag_for"]
