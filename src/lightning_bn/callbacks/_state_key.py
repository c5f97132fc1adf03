"""A ``state_key`` that is computed once per fit instead of at every hook call."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class CachedStateKey(Callback):
    """``state_key`` from :meth:`_state_key_settings`, frozen between ``setup`` and ``teardown``.

    Lightning reads a callback's ``state_key`` on *every* hook call (it names the profiler
    action), several times per training step; derived from the settings, it cost about 0.2 ms
    per step, 5% of a step of the digits MLP. Subclasses call :meth:`_freeze_state_key` in
    ``setup`` (after anything there that thaws it) and :meth:`_thaw_state_key` in ``teardown``
    and ``on_exception`` (Lightning skips ``teardown`` after an exception); outside a run the
    key is computed from the current settings on each read.
    """

    _state_key_cache: str | None = None

    @property
    @override
    def state_key(self) -> str:
        if self._state_key_cache is not None:
            return self._state_key_cache
        return self._generate_state_key(**self._state_key_settings())

    def _state_key_settings(self) -> dict[str, Any]:
        """The settings that tell two callbacks of one class apart (keyword arguments)."""
        return {}

    def _freeze_state_key(self) -> None:
        self._state_key_cache = None
        self._state_key_cache = self.state_key

    def _thaw_state_key(self) -> None:
        self._state_key_cache = None
