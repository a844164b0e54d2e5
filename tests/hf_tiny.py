"""Tiny random PEGASUS and BART checkpoints with real tokenizers, written as save_pretrained writes them (no
download): transformers' config classes, a sentencepiece model in PEGASUS's layout, a byte-level BPE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pubmed_sample.jsonl"
TINY = dict(
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=64,
    dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    init_std=0.3,  # not 0.02: logits then depend on the input, not only on the final_logits_bias
)


def sample_texts(limit: int = 40) -> list[str]:
    """Documents and summaries of ../shared/data/pubmed_sample.jsonl (skips the test when it is absent)."""
    if not SAMPLE.is_file():
        pytest.skip(f"no PubMed sample at {SAMPLE}")
    texts = []
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        texts += [record[key] for key in ("document", "summary") if isinstance(record.get(key), str)]
    return texts[:limit]


def write_pegasus_spm(out: Path, texts: list[str]) -> None:
    """A small sentencepiece model with PEGASUS's layout (pad 0, eos 1, unk 2, no bos) as spiece.model."""
    import sentencepiece as spm

    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(t.replace("\n", " ")[:2000] for t in texts), encoding="utf-8")
    spm.SentencePieceTrainer.Train(
        input=str(corpus),
        model_prefix=str(out / "spiece"),
        vocab_size=400,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    (out / "spiece.vocab").unlink()
    corpus.unlink()


def write_bart_bpe(out: Path, texts: list[str]) -> int:
    """A small byte-level BPE (tokenizers) saved as BART's vocab.json + merges.txt; returns its size."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=600, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok.save_model(str(out))
    return tok.get_vocab_size()


def build(root: Path, family: str, **overrides) -> Path:
    """``root/family``: a tiny random checkpoint of ``family`` (pegasus | bart) with its tokenizer."""
    import transformers

    texts = sample_texts()
    out = root / family
    out.mkdir(parents=True)
    torch.manual_seed(0)
    if family == "pegasus":
        write_pegasus_spm(out, texts)
        tok = transformers.PegasusTokenizer.from_pretrained(str(out))
        cfg = transformers.PegasusConfig(vocab_size=len(tok), activation_function="relu", **{**TINY, **overrides})
        model = transformers.PegasusForConditionalGeneration(cfg)
    else:
        size = write_bart_bpe(out, texts)
        tok = transformers.BartTokenizerFast.from_pretrained(str(out))
        cfg = transformers.BartConfig(vocab_size=size, activation_function="gelu", **{**TINY, **overrides})
        model = transformers.BartForConditionalGeneration(cfg)
    tok.save_pretrained(out)
    model.final_logits_bias.normal_(0, 0.5)  # zeros in a fresh model: a random one shows it is carried over
    model.save_pretrained(out)
    return out
