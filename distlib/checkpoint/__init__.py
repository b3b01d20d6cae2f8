"""Checkpoints: resumable training state (`save_state` / `load_state`) and weight exports.

``state`` saves and loads (``_async``: a save committed in the background; ``_keep``: which
older checkpoints to remove, the newest complete one); ``export`` writes full weights as
safetensors (live or from a checkpoint); both share the folder format of ``_folder`` (staging, manifest, atomic swap) and
ask what depends on the strategy of ``_wrapped``; ``rng`` holds each rank's random states.
"""

from __future__ import annotations

from distlib.checkpoint._async import SaveHandle
from distlib.checkpoint._folder import is_checkpoint
from distlib.checkpoint._keep import latest_checkpoint
from distlib.checkpoint.export import export_weights, merge_weights, save_model
from distlib.checkpoint.state import load_state, save_state

__all__ = ["SaveHandle", "export_weights", "is_checkpoint", "latest_checkpoint", "load_state",
           "merge_weights", "save_model", "save_state"]

SaveHandle.__module__ = "distlib.checkpoint"
