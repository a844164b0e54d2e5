"""pyramidion_ds: Pyramidion long-document encoder-decoders (trainable top-k pooling) with DeepSpeed.

Layout, bottom to top: a module imports only from the rows above it (same row: its own package only).
``tests/unit/test_import_direction.py`` holds this order and fails on an import that runs back up it::

    errors.py    UsageError, DataError, exit codes: what every layer may raise
    distributed/ rank discovery (torchrun / DeepSpeed launcher / SLURM / MPI), hostfiles
    logs.py      one logger; rank 0 speaks
    config/      typed config tree, YAML + dotted overrides, validation
    data/        synthetic corpus, sentencepiece, binarized mmap shards, batching, denoising
    model/       plain PyTorch: top-k operator -> attention -> layers -> encoder stages -> decoder
    engine/      DeepSpeed applied from outside the model (ZeRO, activation checkpointing, precision)
    checkpoint/  the checkpoint format: manifests + checksums, safe loading, consolidation, export dirs
    train/       the training loop, resume, preemption, run-dir lock    generate/  beam search, ROUGE
    bench/       benchmarks printing JSON                              tune/      memory model, plan search
    cli/         console scripts (and ``python -m pyramidion_ds.distributed.selftest``)
"""

__version__ = "0.1.0"
