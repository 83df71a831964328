"""Page codecs for the POOL tier (see `base` for the seam)."""

from speckv.codecs.base import Codec, EncodedPages, PageShape, known_codecs, make_codec

__all__ = ["Codec", "EncodedPages", "PageShape", "known_codecs", "make_codec"]
