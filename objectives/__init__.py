"""headgroup.objectives: calibration, proxies, merging, recovery, evaluation.

Importing the package registers the data-aware merges (`query_aware`) with `gqa.merge`.
"""

from objectives import merging  # noqa: F401  (registers merge methods)
