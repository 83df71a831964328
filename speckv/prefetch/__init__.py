"""Speculative, asynchronous prefetching of KV pages: predictors, the PREFETCH tier,
the transfer worker (see `prefetcher.py`)."""
