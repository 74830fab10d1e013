"""dynvit's built-in stage implementations, grouped by stage kind.

Importing this package registers every built-in plugin; dynvit finds it
through the ``dynvit.plugins`` entry-point group like any other package.
"""

from dynvit.plugins import (  # noqa: F401
    backbones,
    downsamplers,
    dvt,
    exit_policies,
    fusers,
    losses,
    reusers,
    selectors,
    token_reduction,
)
