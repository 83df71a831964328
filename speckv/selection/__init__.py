"""Query-aware page selection (TinyServe / Quest): which sealed pages decode attention reads.

`base` holds the `Selector` ABC, its registry and the shared choice of pages under a
budget; `selectors` the built-in ones; `step` the engine-side plan of each step and
the counters.
"""
