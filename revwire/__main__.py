"""`python -m revwire`: the `revwire` command."""
import sys

from .cli import main

sys.exit(main())
