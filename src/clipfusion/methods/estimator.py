"""What makes a detector an estimator in scikit-learn's sense: its settings are its constructor's
arguments, stored as given; ``get_params()`` returns them, so ``type(d)(**d.get_params())`` (and
``sklearn.base.clone``) makes an equal, unfitted detector; ``set_params`` changes them and forgets
whatever was built from the old ones.  ``describe()`` is apart: the settings in full (presets expanded,
``auto`` resolved), what result files record."""
from __future__ import annotations

import inspect
from typing import Any, TypeVar

from clipfusion.config import DEFAULT_CATEGORY
from clipfusion.errors import ClipfusionError

Self = TypeVar("Self", bound="Estimator")


class Estimator:
    """Base of every detector: ``get_params`` / ``set_params`` / ``describe`` (see the module docstring).

    ``_BUILT``: attributes holding what was built from the settings (models, resolved runtimes),
    dropped by ``set_params``.
    """

    _BUILT: tuple[str, ...] = ()

    @classmethod
    def _param_names(cls) -> list[str]:
        """The named arguments of the constructor (not ``**overrides``)."""
        parameters = inspect.signature(cls.__init__).parameters.values()
        return [p.name for p in parameters
                if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor's arguments as given (``deep`` is accepted for scikit-learn; nothing nests)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self: Self, **params: Any) -> Self:
        """Change constructor arguments; what was built from the old ones is built again when needed."""
        names = self._param_names()
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise ClipfusionError(f"{type(self).__name__} has no setting {', '.join(unknown)}; its settings are "
                                  f"{', '.join(names)}")
        for name, value in params.items():
            setattr(self, name, value)
        self._forget_built()
        return self

    def _forget_built(self) -> None:
        for attribute in self._BUILT:
            self.__dict__.pop(attribute, None)

    def describe(self) -> dict[str, Any]:
        """The settings in full, as result files record them (default: ``get_params``)."""
        return self.get_params()

    def _category(self, category: str | None) -> str:
        """The category to predict for: the one given, else the one fitted or loaded, else ``object``."""
        return category or getattr(self, "category_", None) or DEFAULT_CATEGORY
