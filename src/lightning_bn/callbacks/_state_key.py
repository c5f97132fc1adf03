"""A ``state_key`` that is computed once per fit instead of at every hook call."""

from __future__ import annotations

import sys
import weakref
from typing import Any

from lightning.pytorch.callbacks import Callback
from typing_extensions import override

#: Every instance whose ``state_key`` was read outside a run (to find identical twins).
_LIVE: weakref.WeakSet[CachedStateKey] = weakref.WeakSet()


class CachedStateKey(Callback):
    """``state_key`` from :meth:`_state_key_settings`, frozen between ``setup`` and ``teardown``.

    Lightning reads a callback's ``state_key`` on *every* hook call (it names the profiler
    action), several times per training step; derived from the settings, it cost about 0.2 ms
    per step, 5% of a step of the digits MLP. Subclasses call :meth:`_freeze_state_key` in
    ``setup`` (after anything there that thaws it) and :meth:`_thaw_state_key` in ``teardown``
    and ``on_exception`` (Lightning skips ``teardown`` after an exception); outside a run the
    key is computed from the current settings on each read (:meth:`settings_state_key`), with
    one exception: to Lightning's check of the callback list when a Trainer is built, a callback
    that has not run and has an identical twin that has not run either shows a key of its own,
    so that two identical callbacks in one Trainer reach the callbacks' own ``setup`` check and
    its message (which says what to pass) instead of Lightning's.
    """

    _state_key_cache: str | None = None
    _has_run = False  # set at the first ``setup``: a callback that ran is nobody's twin

    @property
    @override
    def state_key(self) -> str:
        if self._state_key_cache is not None:
            return self._state_key_cache
        key = self.settings_state_key()
        if self._has_run or sys._getframe(1).f_code.co_name != "_validate_callbacks_list":
            return key
        _LIVE.add(self)
        if any(
            other is not self
            and type(other) is type(self)
            and not other._has_run
            and other.settings_state_key() == key
            for other in list(_LIVE)
        ):
            # An identical twin that has not run yet exists (both about to join one Trainer?).
            # Lightning refuses two stateful callbacks with one key when the Trainer is built,
            # with a message about checkpointing; a key of its own lets the Trainer accept both
            # so that the callbacks' ``setup`` refuses them with a message that says what to
            # pass. From the first ``setup`` on, the key is the settings' (what checkpoints use).
            return f"{key}[twin {id(self):x}]"
        return key

    def settings_state_key(self) -> str:
        """The state key derived from the settings (the one checkpoints use)."""
        return self._generate_state_key(**self._state_key_settings())

    def _state_key_settings(self) -> dict[str, Any]:
        """The settings that tell two callbacks of one class apart (keyword arguments)."""
        return {}

    def _freeze_state_key(self) -> None:
        self._state_key_cache = None
        self._state_key_cache = self.settings_state_key()
        self._has_run = True

    def _thaw_state_key(self) -> None:
        self._state_key_cache = None
