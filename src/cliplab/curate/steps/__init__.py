"""Curation steps: one module each, registered by name in `cliplab.curate.steps.registry`."""
