"""Big-model inference: empty init, device-map planning, streaming load, offloaded dispatch.

The public names are re-exported from `distlib`; the modules here are imported lazily.
"""
