"""The one error type of checkpoint loading: a single line naming the file and what was expected."""

from __future__ import annotations


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded; the message names the file and what was expected."""
