"""The hooks a qadapt plugin can implement. Each docstring is the contract.

A plugin is any module (or object) with functions marked ``@qadapt.hookimpl``, published under the ``qadapt``
entry-point group::

    [project.entry-points.qadapt]
    mybackend = "qadapt_mybackend"

See ``docs/plugins.md`` for a whole example.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("qadapt")
hookimpl = pluggy.HookimplMarker("qadapt")


@hookspec
def register_backends(register: Callable) -> None:
    """Register the quantization backends this plugin provides.

    Call ``register(backend)`` once for each backend, where ``backend`` is an instance of
    :class:`qadapt.QuantBackend` with a unique ``name``. Import nothing heavy here: the backend's library is imported
    by its own methods, when it is used.

    :param register: ``register(backend: QuantBackend) -> None``. It raises ``ValueError`` for an object that is not a
        ``QuantBackend``, has no name, or uses a name another plugin registered first.
    :return: nothing; the return value is ignored.
    """
