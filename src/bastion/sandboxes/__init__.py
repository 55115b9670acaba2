"""How a worker process is confined: the sandbox backends, built by :mod:`.factory`.

:mod:`.base` is what every backend offers (the :class:`~.base.Sandbox` protocol) and the
pieces they share; :mod:`.policy` the confinement every backend applies (the seccomp
allow-list, the paths a worker may read); :mod:`.bwrap` (bubblewrap, the default) and
:mod:`.docker` the backends; :mod:`.cgroups` and :mod:`.uids` the host resources they use.
"""
