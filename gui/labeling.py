"""Click-to-label wiring: the Labels dock, the Label menu and its shortcuts, the region popup.

Kept out of MainWindow so the window stays a layout; all state lives in the session's
:class:`core.session_labels.LabelBook` (``controller.session.labels``).
"""
from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QCursor
from PySide6.QtWidgets import QMenu

from .panels.labels_panel import LabelsPanel

SHORTCUTS = {"false_alarm": "F", "defect": "D", "image_ok": "O", "image_ng": "N"}
# The ampersands make F and D work inside the region popup itself (menu mnemonics): while the
# popup is open it has the keyboard, so the window's F / D shortcuts would not fire.
MENU_TEXT = {"false_alarm": "&False alarm (this is fine)", "defect": "Real &defect",
             "image_ok": "Part is OK", "image_ng": "Part is NG"}


def install_labeling(window, area=Qt.DockWidgetArea.RightDockWidgetArea):
    """Add the Labels dock and menu to ``window``; returns (panel, dock)."""
    c, view, settings = window.controller, window.view, window.settings
    s, fb = c.session, c.session.labels
    panel = LabelsPanel()
    dock = window.add_dock("Labels", panel, area)
    panel.set_operator(str(settings.value("operator", "") or "") or s.operator)  # last operator here
    fb.operator = panel.operator()

    def set_operator(name: str) -> None:
        fb.operator = name
        settings.setValue("operator", name)

    def new_shift() -> None:  # the session forgot the name: so do the field and the settings
        panel.set_operator(s.operator)
        settings.setValue("operator", s.operator)

    window.shift_panel.reset_requested.connect(new_shift)

    mark = fb.mark
    m = window.menuBar().addMenu("&Label")
    for kind in ("false_alarm", "defect", "image_ok", "image_ng"):
        window.add_action(m, MENU_TEXT[kind], lambda _=False, k=kind: mark(k), SHORTCUTS[kind])
    m.addSeparator()
    window.add_action(m, "&Undo last label", fb.undo_last, "Ctrl+Z")
    window.reset_weights_action = window.add_action(m, "&Reset channel weights", fb.reset_weights)

    def clicked(row: int, col: int) -> None:
        if not fb.select_at(row, col):
            return
        menu = QMenu(window)
        menu.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        for kind in ("false_alarm", "defect"):
            menu.addAction(f"{MENU_TEXT[kind]}\t{SHORTCUTS[kind]}", lambda k=kind: mark(k))
        window.label_menu = menu  # reachable for tests
        menu.popup(QCursor.pos())

    view.pixel_clicked.connect(clicked)
    panel.mark_requested.connect(mark)
    panel.undo_requested.connect(fb.undo_last)
    panel.export_requested.connect(fb.export)
    panel.reset_weights_requested.connect(fb.reset_weights)
    panel.reweight_toggled.connect(fb.set_reweight)
    panel.withdraw_requested.connect(fb.withdraw)
    panel.restore_requested.connect(fb.restore)
    panel.operator_changed.connect(set_operator)
    c.labels_changed.connect(panel.set_rows)
    c.weights_changed.connect(panel.set_weight_change)
    c.weights_held_back.connect(panel.set_held_back)
    c.can_undo_changed.connect(panel.set_can_undo)
    c.reweight_changed.connect(panel.set_reweight)
    c.selection_changed.connect(lambda contour: panel.set_region_selected(contour is not None))
    c.selection_changed.connect(view.set_selected_region)
    # "Part is OK / NG" label the shown part: with a model and a part on screen
    def part_ready(*_: object) -> None:
        panel.set_model_ready(s.detector is not None and s.shown_id is not None)

    for signal in (c.model_changed, c.display_changed, c.results_changed):
        signal.connect(part_ready)
    c.display_changed.connect(lambda d: None if fb.has_selection else view.set_selected_region(None))
    panel.set_rows(fb.rows())
    return panel, dock
