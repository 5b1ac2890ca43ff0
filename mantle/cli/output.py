"""``-o json`` / ``--output json`` (SPEC 13.1.7): one JSON document on stdout instead of text."""

from __future__ import annotations

import argparse
import json

__all__ = ["output_option", "wants_json", "print_json"]


def output_option(parser: argparse.ArgumentParser) -> None:
    """Add ``-o/--output text|json`` to a command (default ``text``, the usual output)."""
    parser.add_argument("-o", "--output", default="text", choices=("text", "json"),
                        help="output format: text (default) or json")


def wants_json(args) -> bool:
    return getattr(args, "output", "text") == "json"


def print_json(document) -> None:
    """Print ``document`` as indented JSON (UTF-8 text as is); field names are the REST
    API's, times RFC 3339 strings."""
    print(json.dumps(document, indent=2, ensure_ascii=False))
