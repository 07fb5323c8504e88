"""Notebook views over one shared ``Session`` (ipywidgets 8 and ipycanvas; no math here).

    from gandissect_widgets import Session
    from gandissect_widgets.widgets import UnitBrowser, IouRanking, AblationPanel, PaintWidget, LayerSummary
    s = Session(); s.dissect(["layer4", "layer6"], n_samples=500)
    AblationPanel(s)
"""
from gandissect_widgets.widgets.ablation import AblationPanel
from gandissect_widgets.widgets.browser import UnitBrowser
from gandissect_widgets.widgets.paint import PaintWidget
from gandissect_widgets.widgets.ranking import IouRanking
from gandissect_widgets.widgets.summary import LayerSummary

__all__ = ["UnitBrowser", "IouRanking", "AblationPanel", "PaintWidget", "LayerSummary", "dashboard"]


def dashboard(session):
    """All views in tabs, sharing ``session``."""
    import ipywidgets as W
    views = [("units", UnitBrowser(session)), ("ranking", IouRanking(session)), ("ablation", AblationPanel(session)),
             ("paint", PaintWidget(session)), ("layers", LayerSummary(session))]
    tab = W.Tab(children=[v for _, v in views])
    for i, (name, _) in enumerate(views):
        tab.set_title(i, name)
    return tab
