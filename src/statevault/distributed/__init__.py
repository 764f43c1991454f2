"""torch.distributed support: chunk geometry (pure), the save coordinator and resharding loads.

Importing this package imports nothing heavy; the modules that need torch import it themselves.
"""
