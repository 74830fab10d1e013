"""``dynvit import-cfvit``: the authors' CF-ViT checkpoint as a dynvit pipeline checkpoint."""

from __future__ import annotations

from dynvit.commands.import_authors import AuthorsImportCommand

COMMAND = AuthorsImportCommand("cfvit", {224: "cfvit_deit_s", 288: "cfvit_star_deit_s"})
HELP = COMMAND.help
add_arguments = COMMAND.add_arguments
run = COMMAND.run
