"""`matlm setup-eval-data`: extract the offline eval data (see matlm.evaluation.setup_data)."""
from matlm.evaluation.setup_data import add_arguments, run  # noqa: F401
