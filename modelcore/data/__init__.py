"""Text data for modelcore: tokenizer, named corpora, batches, unsupervised domain discovery.

- ``tokenizer``: byte-level BPE (``train_tokenizer``, ``load_tokenizer``), exact round trip.
- ``corpus`` / ``sources``: named domains of the Python installation with deterministic,
  leak-free train / held-out splits (``build_corpus``).
- ``synthetic``: separable multi-domain text for fast tests (``synthetic_corpus``).
- ``batches``: training and evaluation batches with exact byte counts for bits per byte.
- ``discovery``: c-BTM clustering (TF-IDF -> SVD -> balanced k-means, or Ward tree).
"""

from modelcore.data.batches import (
    EvalBatch,
    bits_per_byte,
    count_bytes,
    encode_texts,
    eval_batches,
    stream_batches,
    token_batches,
    token_stream,
)
from modelcore.data.corpus import Corpus, Domain, build_corpus, chunk_text
from modelcore.data.discovery import (
    ClusterTree,
    DomainDiscovery,
    discover_domains,
    load_discovery,
    save_discovery,
)
from modelcore.data.sources import DOMAIN_NAMES
from modelcore.data.synthetic import synthetic_corpus
from modelcore.data.tokenizer import (
    EOT,
    PAD,
    decode,
    encode,
    eot_id,
    load_tokenizer,
    pad_id,
    save_tokenizer,
    token_byte_lengths,
    tokenizer_to_json,
    train_tokenizer,
)

__all__ = [
    "DOMAIN_NAMES",
    "EOT",
    "PAD",
    "ClusterTree",
    "Corpus",
    "Domain",
    "DomainDiscovery",
    "EvalBatch",
    "bits_per_byte",
    "build_corpus",
    "chunk_text",
    "count_bytes",
    "decode",
    "discover_domains",
    "encode",
    "encode_texts",
    "eot_id",
    "eval_batches",
    "load_discovery",
    "load_tokenizer",
    "pad_id",
    "save_discovery",
    "save_tokenizer",
    "stream_batches",
    "synthetic_corpus",
    "token_batches",
    "token_byte_lengths",
    "token_stream",
    "tokenizer_to_json",
    "train_tokenizer",
]
