"""Generation: batched beam search with a KV cache over an export dir, ROUGE.

The export dir (consolidated ZeRO shards) is written and loaded by ``pyramidion_ds/checkpoint/export.py``.

    search.py  beam search / sampling over encode + decode_step; exhaustive_search (the reference)
    inputs.py  data-dir split or text/jsonl file -> examples; world-size-independent batches per rank
    runner.py  pyramidion-generate end to end (1..N processes), outputs, ROUGE, explain pages
    rouge.py   ROUGE-1/2/L/Lsum via rouge_score;  explain.py  the HTML selection map
"""
