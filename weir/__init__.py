"""Weir: streaming inference and online monitoring for River models on Kafka and Redis."""

from __future__ import annotations

__version__ = "0.1.0"
