"""Curation: the data stage between sources and training (`cliplab curate`).

``config`` (the schema), ``pipeline`` (`run_curation`: read the pool, run the steps, write the
outputs; resumable), ``pool`` (items as records that remember where their image lives),
``engine`` / ``ray_engine`` (a step's ``map`` over chunks, locally or on Ray actors),
``outputs`` (kept pool, ``dropped.parquet``), ``report`` (report.md/html), ``steps/`` (one
module per step, one registry), and the statistics curation builds on (concept frequency
tables, exponentially imbalanced sampling).
"""
