"""The Recipe menu: new, open, recent, save, quit — never losing unsaved work — and the
operator/engineer roles (PIN).

Kept out of MainWindow so the window stays a layout. State lives in the session
(``session.dirty``, ``session.role``); this module only asks the person and forwards.
"""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QStandardPaths
from PySide6.QtGui import QKeySequence
from PySide6.QtWidgets import QFileDialog, QInputDialog, QLineEdit, QMessageBox
from core.roles import ENGINEER
from core.session import DEMO_RECIPE_NAME

RECIPE_FILTER = "OK/NG recipes (*.okrecipe)"
MAX_RECENT = 8


def recent_list(value) -> list[str]:
    """QSettings gives a lone string back for a one-item list (and None for none): always a list."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    return [str(v) for v in value if v]


class RecipeMenu:
    def __init__(self, window) -> None:
        self.w = window
        self.session = s = window.controller.session
        m = window.menuBar().addMenu("&Recipe")
        self.new_action = window.add_action(m, "&New recipe", self.new_recipe, QKeySequence.StandardKey.New)
        window.add_action(m, "&Open recipe…", self.open_dialog, "Ctrl+Shift+O")
        self.recent_menu = m.addMenu("Open &recent")
        window.add_action(m, "&Save recipe", self.save, QKeySequence.StandardKey.Save)
        self.save_as_action = window.add_action(m, "Save recipe &as…", self.save_as, "Ctrl+Shift+S")
        m.addSeparator()
        self.pin_action = window.add_action(m, "Set engineer &PIN…", self.set_pin)
        self.lock_action = window.add_action(m, "&Operator mode (lock settings)", s.lock, "Ctrl+L")
        self.unlock_action = window.add_action(m, "&Engineer mode…", self.unlock, "Ctrl+Shift+L")
        m.addSeparator()
        window.add_action(m, "&Quit", window.close, QKeySequence.StandardKey.Quit)
        self.update_recent()

    # -- unsaved work ---------------------------------------------------------------------
    def confirm_discard(self, doing: str) -> bool:
        """True when it is fine to go on: nothing unsaved, saved now, or discarded on purpose."""
        s = self.session
        if not s.dirty:
            return True
        if s.recipe_path is None and s.recipe.name != DEMO_RECIPE_NAME and s.labels.store_path.exists():
            kept = (f"This recipe was never saved: its labels stay in {s.labels.store_path} if you "
                    f"discard it, and no other recipe uses them.")
        else:
            kept = ("The labels themselves are kept either way (each was stored when it was made; the "
                    "next fit replays them): undo or withdraw a label to take it back.")
        box = QMessageBox(QMessageBox.Icon.Warning, "Unsaved changes",
                          f"Recipe “{s.recipe.name}” has unsaved changes (OK set, thresholds, model or "
                          f"labels' effect). Save them before you {doing}?\n\n{kept}", parent=self.w)
        save = box.addButton("Save", QMessageBox.ButtonRole.AcceptRole)
        discard = box.addButton("Discard changes", QMessageBox.ButtonRole.DestructiveRole)
        cancel = box.addButton("Cancel", QMessageBox.ButtonRole.RejectRole)
        box.setDefaultButton(save)
        box.setEscapeButton(cancel)
        self.w.question_box = box  # reachable for tests
        box.exec()
        clicked = box.clickedButton()
        if clicked is discard:
            return True
        if clicked is save:
            self.save()
            self.w._let_the_save_end()  # its model is written on the engine thread: go on once it is
            return not s.dirty
        return False

    def new_recipe(self) -> None:
        if self.session.role != ENGINEER:  # refused (and said why) before asking about changes
            self.session.new_recipe("untitled")
            return
        if self.confirm_discard("start a new recipe"):
            self.session.new_recipe("untitled")

    # -- files ----------------------------------------------------------------------------
    def _recipes_dir(self) -> str:
        loc = QStandardPaths.StandardLocation.AppDataLocation
        d = Path(QStandardPaths.writableLocation(loc)) / "recipes"
        d.mkdir(parents=True, exist_ok=True)
        return str(d)

    def open_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self.w, "Open recipe", self._recipes_dir(), RECIPE_FILTER)
        if path:  # asked once the file is known: reopening the open recipe is asked as such
            self.open(path)

    def _opening(self, path: str) -> str:
        """What opening ``path`` does, for the unsaved-changes question."""
        current = self.session.recipe_path
        if current is not None and Path(path).resolve() == Path(current).resolve():
            return "reopen it as it was last saved (Discard goes back to that)"
        return "open another recipe"

    def open(self, path: str, confirmed: bool = False) -> None:
        """Open ``path``; a file that is gone or no recipe is refused before the question
        about unsaved changes."""
        if not Path(path).is_file():
            self.session.error.emit(f"Recipe file not found: {path} (removed from the recent list)")
            self._forget(path)
            return
        if problem := self.session.recipe_file_problem(path):
            self.session.error.emit(problem)
            return
        if not confirmed and not self.confirm_discard(self._opening(path)):
            return
        self.session.open_recipe(path)
        self._remember(path)

    def save(self) -> None:
        s = self.session
        if not s.save_recipe():
            self.save_as()
        elif s.recipe_path:
            self._remember(str(s.recipe_path))

    def save_as(self) -> None:
        from core.recipes import safe_file_stem  # tiny, Qt-free helper module

        link = getattr(self.w, "line_link", None)
        if link is not None and link.serving:  # the line logs beside the recipe it started with
            self.session.error.emit("Stop serving the line (Line panel) before saving the recipe under another "
                                    "name: the line logs its parts beside the recipe it was started with")
            return

        start = str(Path(self._recipes_dir()) / (safe_file_stem(self.session.recipe.name) + ".okrecipe"))
        path, _ = QFileDialog.getSaveFileName(self.w, "Save recipe", start, RECIPE_FILTER)
        if path:
            path = path if path.endswith(".okrecipe") else path + ".okrecipe"
            s = self.session
            s.save_recipe(path)
            self.w._let_the_save_end()  # its model is written on the engine thread
            self.w._update_title()  # saved, the recipe took the file's name
            if s.recipe_path is not None and Path(s.recipe_path).resolve() == Path(path).resolve():
                self._remember(path)  # only a recipe that was saved (a refused save is no recent file)

    def _remember(self, path: str) -> None:
        recent = [p for p in recent_list(self.w.settings.value("recent")) if p != path]
        self.w.settings.setValue("recent", [path, *recent][:MAX_RECENT])
        self.update_recent()

    def _forget(self, path: str) -> None:
        self.w.settings.setValue("recent", [p for p in recent_list(self.w.settings.value("recent")) if p != path])
        self.update_recent()

    def update_recent(self) -> None:
        self.recent_menu.clear()
        self.recent_menu.setToolTipsVisible(True)
        recent = recent_list(self.w.settings.value("recent"))
        stems = [Path(p).stem for p in recent]
        for p, stem in zip(recent, stems):
            # two recipes of one name in different folders: the folder tells them apart
            text = stem if stems.count(stem) == 1 else f"{stem} — {Path(p).parent}"
            action = self.recent_menu.addAction(text, lambda p=p: self.open(p))
            action.setToolTip(p)
        self.recent_menu.setEnabled(not self.recent_menu.isEmpty())

    # -- roles ----------------------------------------------------------------------------
    def set_pin(self) -> None:
        pin, ok = QInputDialog.getText(self.w, "Engineer PIN", "New engineer PIN (at least 4 characters):",
                                       QLineEdit.EchoMode.Password)
        if ok and pin:
            again, ok = QInputDialog.getText(self.w, "Engineer PIN", "The same PIN again:", QLineEdit.EchoMode.Password)
            if ok and again != pin:
                self.session.error.emit("The two PINs differ: the PIN was not changed.")
            elif ok:
                self.session.set_pin(pin)

    def unlock(self) -> None:
        if self.session.role != "operator":
            self.session.status.emit("Already in engineer mode")
            return
        pin, ok = QInputDialog.getText(self.w, "Engineer mode", "Engineer PIN:", QLineEdit.EchoMode.Password)
        if ok:
            self.session.unlock(pin)

    def show_role(self, role: str) -> None:
        locked = role == "operator"
        self.pin_action.setEnabled(not locked)
        self.new_action.setEnabled(not locked)  # engineer only (a new recipe would leave the lock)
        self.save_as_action.setEnabled(not locked)
        self.lock_action.setEnabled(not locked)
        self.unlock_action.setEnabled(locked)
