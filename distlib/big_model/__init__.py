"""Big-model inference: empty init, device-map planning, streaming load, offloaded dispatch.

``empty`` (empty init), ``sizes`` and ``device_map`` (planning, pure), ``files`` (checkpoint
formats), ``offload`` (disk weights), ``loading`` (`load_checkpoint`), ``hooks`` (the forward
hooks) and ``placement`` (`dispatch`, `load_checkpoint_and_dispatch`; not a module named
``dispatch``, so that ``distlib.big_model.dispatch`` is the function alone). Importing it
imports torch (the checkpoint readers need it).
"""

from __future__ import annotations

from distlib.big_model.device_map import DeviceMap, infer_device_map
from distlib.big_model.empty import init_empty_weights, init_on_device
from distlib.big_model.loading import load_checkpoint
from distlib.big_model.placement import dispatch, load_checkpoint_and_dispatch

__all__ = ["DeviceMap", "dispatch", "infer_device_map", "init_empty_weights", "init_on_device",
           "load_checkpoint", "load_checkpoint_and_dispatch"]
