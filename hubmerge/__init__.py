"""hubmerge: partial merging of two independently trained networks."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hubmerge")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

from . import arch_specs  # noqa: E402,F401  (registers hubmerge's own models in timm)
from .api import MergeReport, MergeResult, Prepared, interpolation_curve, merge  # noqa: E402
from .errors import (  # noqa: E402
    CheckpointError, DataError, HubmergeError, IncompatibleModelsError, RemoteError, UnsupportedModelError,
    UsageError,
)
from .evaluate import Ensemble, evaluate  # noqa: E402
from .options import MergeOptions  # noqa: E402
from .partitioned import PartialMergedModel  # noqa: E402

__all__ = [
    "merge", "interpolation_curve", "MergeResult", "MergeReport", "MergeOptions", "Prepared", "PartialMergedModel", "Ensemble", "evaluate",
    "HubmergeError", "UsageError", "UnsupportedModelError", "IncompatibleModelsError", "DataError",
    "CheckpointError", "RemoteError", "__version__",
]
