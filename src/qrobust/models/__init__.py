"""Model registry and factory. Importing this package registers every built-in family."""

from qrobust.models import empir, qnn  # noqa: F401  (registration side effect)
from qrobust.models.common import MCDropout
from qrobust.models.registry import create_model, get_entry, list_models, register_model

__all__ = ["MCDropout", "create_model", "get_entry", "list_models", "register_model"]
