"""matplotlib, for the figures of `npc bench` and `npc train`: an optional dependency (the `bench` extra).

The sidecar that runs on players' PCs never draws, so matplotlib is not a runtime dependency and
this is the one place that imports it, lazily, when a figure is about to be drawn.
"""

from __future__ import annotations

from types import ModuleType

from sidecar.errors import UserError

INSTALL_HINT = "pip install 'npc-sidecar[bench]' or make bench"


class FiguresUnavailable(UserError):
    """matplotlib is not installed: no PNG can be drawn."""


def require_matplotlib() -> None:
    """Raises FiguresUnavailable, naming how to install it, unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise FiguresUnavailable(f"matplotlib is not installed (the bench extra): run {INSTALL_HINT}") from e


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend (files only: no display is needed or opened)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
