"""pyramidion_ds: Pyramidion long-document encoder-decoders (trainable top-k pooling) with DeepSpeed.

Layout (data flows top to bottom)::

    config/    typed config tree, YAML + dotted overrides, validation
    data/      synthetic corpus, sentencepiece, binarized mmap shards, batching, denoising
    model/     plain PyTorch: top-k operator -> attention -> layers -> encoder stages -> decoder
    dist/      rank discovery (torchrun / DeepSpeed launcher / SLURM / MPI)
    engine/    DeepSpeed applied from outside the model (ZeRO, checkpointing, precision)
    train/     the training loop, checkpoints, resume, logging
    generate/  consolidation, beam search, ROUGE
    bench/     benchmarks printing JSON
    cli/       console scripts
"""
__version__ = "0.1.0"
