"""Console scripts: pyramidion-preprocess, -train, -generate, -tune, -bench (fairseq-style names)."""
