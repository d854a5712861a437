"""Where a pair's committed projector lives: ``projectors/<receiver>--<sharer>/`` beside this module."""

from __future__ import annotations

from pathlib import Path

from fedattn.systems.fedrefine.projector import CONFIG_FILE

PROJECTORS = Path(__file__).parent / "projectors"  # committed projectors, one folder per pair


def projector_folder_name(receiver: str, sharer: str) -> str:
    """'<receiver>--<sharer>' (a path's last part stands for the model)."""
    return f"{Path(receiver).name}--{Path(sharer).name}"


def default_projector_dir(receiver: str, sharer: str) -> Path | None:
    """The committed projector for this pair, if there is one (a folder holding its description)."""
    directory = PROJECTORS / projector_folder_name(receiver, sharer)
    return directory if (directory / CONFIG_FILE).is_file() else None
