"""Big-model inference: empty init, device-map planning, streaming load, offloaded dispatch.

``import distlib.big_model`` imports no torch; torch is imported when a function runs.
"""

from __future__ import annotations

from distlib.big_model.files import load_checkpoint
from distlib.big_model.device_map import DeviceMap, infer_device_map
from distlib.big_model.hooks import dispatch, load_checkpoint_and_dispatch
from distlib.big_model.empty import init_empty_weights, init_on_device

__all__ = ["DeviceMap", "dispatch", "infer_device_map", "init_empty_weights", "init_on_device",
           "load_checkpoint", "load_checkpoint_and_dispatch"]
