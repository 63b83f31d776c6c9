"""Retrieval: find the experts whose domain fits a text (docs/architecture.md, "Retrieval").

``embedders`` (the ``Embedder`` interface, hashing TF-IDF; MiniLM in ``minilm``),
``vectors`` (an expert's vectors from its datasheet samples), ``index`` (FAISS per base
revision), ``store`` (database rows), ``service`` (``Retrieval``: build, catch up, search).
"""
