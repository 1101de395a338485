"""Serving: `cliplab index` builds a searchable index of a collection (vectors in FAISS or Milvus,
metadata in SQLite, the model's fingerprint); `cliplab serve` answers text/image search and
zero-shot labelling over HTTP (FastAPI) with a plain HTML/JS page.

Modules: ``store`` (SQLite
metadata), ``faiss_index`` / ``milvus_index`` (vector backends), ``build`` (resumable index
building), ``index`` (an opened, complete index), ``app`` (the HTTP API and page). The
collection being indexed (a source as items with their original files) is `cliplab.data.collection`.
"""
