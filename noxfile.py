"""nox sessions for distlib. Run nox from its own environment, never from one holding distlib:
nox pulls in virtualenv, which pulls in PyPA's unrelated `distlib` package (see README.md).

The torch build is chosen by $TORCH_SPEC (default: torch==2.13.0, the CPU build CI uses);
GPU users set e.g. TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'.
"""

from __future__ import annotations

import os
import shlex

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = False
nox.options.sessions = ["tests", "lint", "typecheck", "docs"]

TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")
XLA_SPEC = os.environ.get("XLA_TORCH_SPEC", "torch==2.9.0 torch_xla==2.9.0")
PIP = ("python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check")


def _install(session: nox.Session, *extras: str, torch_spec: str = TORCH_SPEC) -> None:
    """Install torch first (so no dependency resolution pulls another build), then distlib."""
    session.run(*PIP, *shlex.split(torch_spec))
    target = f".[{','.join(extras)}]" if extras else "."
    session.run(*PIP, "-e", target, *shlex.split(torch_spec))


@nox.session
def tests(session: nox.Session) -> None:
    """Unit, property, multiprocess and doc tests, plus doctests of the package (CPU)."""
    _install(session, "test")
    args = session.posargs or ["tests", "distlib", "-p", "no:cacheprovider",
                               "--durations=15", "--ignore=tests/xla",
                               # the built site's browser check runs in the docs session
                               "--ignore=tests/site"]
    session.run("python", "-m", "pytest", *args, env={"PYTHONHASHSEED": "0"})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the package, tests, examples and benchmarks; the layering contract."""
    session.run(*PIP, "ruff>=0.6")
    paths = [p for p in ("distlib", "tests", "examples", "benchmarks", "noxfile.py", "conftest.py")
             if os.path.exists(p)]
    session.run("ruff", "check", *paths)
    # The layering contract (pyproject.toml [tool.importlinter]): no circles, no import that
    # runs back up, the launcher apart from training code. It reads the sources in place.
    session.run(*PIP, "import-linter>=2.1")
    session.run("lint-imports")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on distlib/."""
    _install(session)
    session.run(*PIP, "mypy>=1.11", "types-PyYAML", "types-psutil", "types-tqdm")
    session.run("mypy", "distlib")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation with mkdocs --strict (API pages from the docstrings, pictures
    drawn from distlib's code), then open every page in headless Chromium (tests/site/)."""
    _install(session, "docs")
    site = session.create_tmp() + "/site"
    session.run("mkdocs", "build", "--strict", "--site-dir", site,
                env={"NO_MKDOCS_2_WARNING": "1"})
    # The built site: every page renders in a browser, links and pictures resolve, and the
    # reference page has a heading for every public name. Chromium: $DISTLIB_CHROMIUM or
    # `chromium` on the PATH (.ci/run installs Debian's); playwright never downloads one.
    session.run("python", "-m", "pytest", "tests/site", "tests/test_reference.py",
                "-p", "no:cacheprovider", "-q",
                env={"DISTLIB_SITE_DIR": site, "DISTLIB_REQUIRE_BROWSER": "1",
                     "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1"})


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks, side by side with the raw torch baseline and Accelerate / Fabric."""
    _install(session, "test")
    session.run(*PIP, "accelerate", "lightning", *shlex.split(TORCH_SPEC))
    names = session.posargs or sorted(
        f[:-3] for f in os.listdir("benchmarks") if f.endswith(".py") and not f.startswith("_"))
    for name in names:
        session.run("python", f"benchmarks/{name}.py")


@nox.session(venv_backend="venv", reuse_venv=True)
def xla(session: nox.Session) -> None:
    """XLA tests on PJRT_DEVICE=CPU, in their own reused environment (torch 2.9 + torch_xla 2.9).

    The environment is ~7 GB (torch 2.9.0 exists here only as the CUDA build) and takes a few
    minutes to build cold, so it is kept between runs: `nox --envdir ~/.cache/distlib-nox -s xla`
    keeps it outside the clone, and a rerun installs in seconds.
    """
    session.run(*PIP, *shlex.split(XLA_SPEC))
    session.run(*PIP, "-e", ".", "pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100",
                "numpy>=1.24", *shlex.split(XLA_SPEC))
    # A broken torch_xla must fail here: tests/xla would otherwise all skip, and pass.
    session.run("python", "-c", "import torch, torch_xla; print(torch.__version__, "
                "torch_xla.__version__)")
    session.run("python", "-m", "pytest", "tests/xla", "-p", "no:cacheprovider", "-v",
                "--durations=5", env={"PJRT_DEVICE": "CPU"})
