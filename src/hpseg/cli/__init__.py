"""Command-line interface: ``hpseg <command> …`` (also ``python -m hpseg``).

The only layer that parses arguments and prints: every command reads its configuration here and
hands explicit arguments to the library (``hpseg.pipeline``, ``hpseg.segmenter``, …).
"""

from hpseg.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
