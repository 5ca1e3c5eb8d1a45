"""headgroup.objectives: calibration, proxies, merging, recovery, evaluation.

Importing the package registers the data-aware merges (`query_aware`) with `gqa.merge`, the
long-context tasks (`long_ppl`, `passkey`, `mdqa`) with objectives.evaluate and the `reading`
split with objectives.data.
"""

from objectives import long_context, merging, train_text  # noqa: F401  (registrations)
