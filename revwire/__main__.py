"""`python -m revwire`: the `revwire` command."""
import sys

from .tools.cli import main

sys.exit(main())
