"""The registries of the pluggable parts, keyed by the config field that names one.

`speckv.config` is a leaf: it checks the form of every option but imports no
subsystem, so it does not know which codecs, pool backends, selectors, eviction
policies or predictors exist. This module does: `check_names` checks a config's
names against the registries (the engine calls it before loading any weights),
and `known` lists them for help texts. A new plugin is one class plus one line in
its registry; nothing here or in the config changes.
"""

from __future__ import annotations

from speckv.codecs.base import CODECS, known_codecs, validate_codec_name
from speckv.config import EngineConfig
from speckv.kv.eviction import EVICTIONS
from speckv.pool.base import POOLS
from speckv.pool.link import parse_link
from speckv.prefetch.predictors import PREDICTORS
from speckv.selection.base import SELECTORS


def known(kind: str) -> list[str]:
    """The names a config field of `kind` (a field's `plugin` metadata) accepts."""
    lists = {"pool": lambda: ["none", *POOLS.names()], "codec": known_codecs,
             "eviction": EVICTIONS.names, "selector": SELECTORS.names,
             "predictor": lambda: ["none", *PREDICTORS.names()]}
    return lists[kind]()


def check_names(config: EngineConfig) -> EngineConfig:
    """Returns `config` once every plugin it names is registered.

    Raises:
        ValueError: an unknown name; the message lists the known ones.
    """
    pc = config.pool
    if pc.pool != "none" and pc.pool not in POOLS:
        raise ValueError(f"unknown pool backend {pc.pool!r}; known: {', '.join(known('pool'))}")
    EVICTIONS.get(pc.eviction)
    validate_codec_name(pc.codec)
    if pc.link is not None:
        parse_link(pc.link)
    SELECTORS.get(config.selection.selector)
    for name in config.prefetch.predictors:
        if name not in PREDICTORS:
            raise ValueError(f"unknown predictor {name!r}; known: {', '.join(known('predictor'))}")
    return config


__all__ = ["CODECS", "check_names", "known"]
