"""hubmerge: partial merging of two independently trained networks.

The public names load on first use (PEP 562), so ``import hubmerge`` and the command line's help and usage
errors do not pay for torch and timm. hubmerge's own models are registered in timm when
``hubmerge.arch_specs`` is imported, which every function that builds or loads a model does first; to
create them with plain ``timm.create_model`` before that, ``import hubmerge.arch_specs``.
"""

from __future__ import annotations

from importlib import import_module
from importlib.util import find_spec
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("hubmerge")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

_WHERE = {
    "merge": "api", "merge_many": "api", "interpolation_curve": "api", "MergeResult": "api", "MergeReport": "api",
    "Prepared": "api",
    "MergeOptions": "options", "PartialMergedModel": "partitioned", "Ensemble": "evaluate",
    "HubmergeError": "errors", "UsageError": "errors", "UnsupportedModelError": "errors",
    "IncompatibleModelsError": "errors", "DataError": "errors", "CheckpointError": "errors", "RemoteError": "errors",
}
__all__ = [*_WHERE, "__version__"]

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from .api import MergeReport, MergeResult, Prepared, interpolation_curve, merge, merge_many  # noqa: F401
    from .errors import (  # noqa: F401
        CheckpointError, DataError, HubmergeError, IncompatibleModelsError, RemoteError, UnsupportedModelError,
        UsageError,
    )
    from .evaluate import Ensemble  # noqa: F401
    from .options import MergeOptions  # noqa: F401
    from .partitioned import PartialMergedModel  # noqa: F401


def __getattr__(name: str) -> Any:
    """A public name, or a stage module (``hubmerge.evaluate`` is the evaluation stage: its function is
    ``hubmerge.evaluate.evaluate``, since importing a submodule binds its name on the package)."""
    if name in _WHERE:
        value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    elif find_spec(f"{__name__}.{name}") is not None:
        value = import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'hubmerge' has no attribute {name!r}")
    globals()[name] = value
    return value
