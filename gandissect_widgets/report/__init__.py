"""Figures (matplotlib) and reports built from engine results; no computation of statistics here."""
from gandissect_widgets.report.figures import save_figure

__all__ = ["save_figure"]
