"""Two measurements in one file, for tests: ``note`` writes a file into its work folder and
``read_note`` (which needs it) reads that file through ``cell.needed["note"].workdir``."""
from dataclasses import dataclass

from ablate.measure import MODEL_KEYS, register_measure


@dataclass
class NoteSettings:
    text: str = "hello"


@register_measure("note", settings=NoteSettings, uses=MODEL_KEYS + ("seed",), columns=("note_chars",))
def note(cell, progress: bool = True) -> dict:
    """Writes a note into its work folder."""
    text = f"{cell.settings('note').text} from {cell.id}"
    (cell.workdir / "note.txt").write_text(text)
    return {"note_chars": len(text)}


@dataclass
class ReadNoteSettings:
    extra_metric: str | None = None  # also return a metric of this name (to test name clashes)


@register_measure("read_note", settings=ReadNoteSettings, uses=MODEL_KEYS + ("seed",), needs=("note",),
                  columns=("read_note_text",))
def read_note(cell, progress: bool = True) -> dict:
    """Reads the note its prerequisite wrote."""
    prior = cell.needed["note"]
    out = {"read_note_text": (prior.workdir / "note.txt").read_text(),
           "read_note_chars": prior.metrics["note_chars"]}
    extra = cell.settings("read_note").extra_metric
    if extra:
        out[extra] = 1.0
    return out
