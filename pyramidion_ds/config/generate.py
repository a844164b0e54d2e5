"""Generation section of the config (flags named like fairseq-generate)."""

from __future__ import annotations

from dataclasses import dataclass

from .core import ConfigError, option


@dataclass
class GenerationConfig:
    beam: int = option(4, "beam size", min=1)
    nbest: int = option(1, "hypotheses written per source", min=1)
    lenpen: float = option(1.0, "length penalty: score / length**lenpen")
    min_len: int = option(1, "minimum generated length", min=0)
    max_len_a: float = option(0.0, "maximum length = a * source length + b", min=0.0)
    max_len_b: int = option(200, "maximum length = a * source length + b", min=1)
    no_repeat_ngram_size: int = option(0, "block repeated n-grams of this size; 0 = off", min=0)
    sampling: bool = option(False, "sample instead of beam search")
    temperature: float = option(1.0, "sampling temperature", greater_than=0.0)
    batch_size: int = option(8, "sources per batch", min=1)
    max_tokens: int = option(0, "source-token budget per batch; 0 = use batch_size only", min=0)
    gen_subset: str = option("test", "split to generate for")
    results_path: str = option("", "directory for hypotheses and scores; empty = print only")
    hard_topk: bool = option(False, "inference: exact top-k selection in the encoder (no mixing)")
    no_cuda_graph: bool = option(
        False,
        "on CUDA, decode eagerly with the growing KV cache instead of "
        "replaying each step from a CUDA graph over a static cache",
    )
    explain: int = option(0, "write an HTML selection map for the first N documents", min=0)
    seed: int = option(1, "sampling seed (a batch's draws depend on it and the batch only)")
    progress: bool = option(True, "progress bar on rank 0")

    def validate(self) -> None:
        if self.nbest > self.beam:  # the search keeps `beam` hypotheses per source: it has no more to write
            raise ConfigError(f"generation.nbest: got {self.nbest}, expected at most generation.beam ({self.beam})")
