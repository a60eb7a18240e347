"""`python -m glimr ...`: the same as the `glimr` command (useful from a source checkout or a worktree)."""
import sys

from glimr.cli import main

sys.exit(main())
