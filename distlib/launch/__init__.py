"""Launching: the ``distlib`` command line, config files and (soon) ``launch()``."""
