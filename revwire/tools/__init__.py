"""Tools around the compiler: model specs, revwire files and checkpoints, the CLI."""
