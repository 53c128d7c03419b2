"""Command-line options several `muse` subcommands share, defined once: their names, help and
defaults stay the same everywhere."""

from __future__ import annotations

import argparse

REGISTRY_HELP = "the registry: a directory, or s3://BUCKET/PREFIX (README, 'A registry on object storage')"
SCORE_LOG_HELP = "the score log: a directory, one of its files, or an s3:// URL (default: REGISTRY/scorelog)"


def add_registry(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", required=True, help=REGISTRY_HELP)


def add_score_log(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scores", help=SCORE_LOG_HELP)
