"""The runtime: reversible stages and their autograd engine, recompute replay, meters."""
