"""Curation: the data stage between sources and training. Today it holds the data statistics
curation builds on (concept frequency tables, exponentially imbalanced sampling); the
``cliplab curate`` steps (dedup, filters, decontamination, balancing) will live here, one module
each."""
