"""``dynvit import-lfvit``: the authors' LF-ViT checkpoint as a dynvit pipeline checkpoint."""

from __future__ import annotations

from dynvit.commands.import_authors import AuthorsImportCommand

COMMAND = AuthorsImportCommand("lfvit", {224: "lfvit_deit_s", 288: "lfvit_star_deit_s"})
HELP = COMMAND.help
add_arguments = COMMAND.add_arguments
run = COMMAND.run
