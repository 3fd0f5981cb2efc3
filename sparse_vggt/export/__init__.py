"""Export (`sparse-vggt export`): the merged model as a COLMAP workspace, PLY, GLB, plots and report.md.

Files: ``stage`` (the entry), ``formats`` (the registry of what is written, in order), ``context`` (what a format
writer receives), one module per format (``colmap``, ``ply``, ``glb``, ``plots``, ``rerun_log``), ``bundle_adjust``
(optional refinement of the COLMAP model) and ``report`` (report.md).
"""

from .context import ExportError
from .stage import run

__all__ = ["ExportError", "run"]
