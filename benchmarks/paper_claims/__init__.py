"""One module per claim of `benchmarks/papers.py`: ``CLAIM`` (one line), ``PAPER`` (citation),
``BASE`` (which base model it uses) and ``run(ctx: ClaimContext) -> dict`` (an `entry`)."""
