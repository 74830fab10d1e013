"""``dynvit import-dvt``: the authors' DVT checkpoint as a dynvit pipeline checkpoint."""

from __future__ import annotations

from dynvit.commands.import_authors import AuthorsImportCommand

COMMAND = AuthorsImportCommand("dvt", {224: "dvt_deit_s"})
HELP = COMMAND.help
add_arguments = COMMAND.add_arguments
run = COMMAND.run
