"""``python -m distlib``: the same entry point as the ``distlib`` command."""

from distlib.cli import main

raise SystemExit(main())
