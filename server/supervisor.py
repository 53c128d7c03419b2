"""`muse serve`'s main process: Granian, which starts the workers and starts a new one in
place of any that dies (its ``respawn_failed_workers``), with the restarts counted and
logged.

Granian offers no hook for a respawn, so ``_respawn_workers`` is extended here; it is
private API, and tests/test_faults.py kills a worker under load to check it still works
with the Granian installed.  A worker that dies again within ~5 s of its restart is a crash
loop: Granian then stops the server (and its supervisor -- Kubernetes, systemd -- starts it
again) rather than burn the CPU restarting it.

The count is a prometheus_client multiprocess counter written by this process into the
directory the workers' /metrics merges; a dead worker's live gauges (``muse_ready``) are
removed from there, so a scrape counts only live workers.

On Linux Granian gives each worker a listening socket of its own (SO_REUSEPORT): when a
worker dies, the connections the kernel had queued on its socket are reset, unless
net.ipv4.tcp_migrate_req is 1.  Without that setting the workers share one listening socket
instead (Granian's way on other systems), so a dying worker loses only the requests it
was serving."""

from __future__ import annotations

import logging
import pathlib
import signal
import socket
from typing import Any

from granian import Granian
from granian.net import SocketSpec
from prometheus_client import Counter, multiprocess, values

log = logging.getLogger("muse.supervisor")


class SupervisedGranian(Granian):  # type: ignore[misc, valid-type]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, respawn_failed_workers=True, **kwargs)
        # prometheus_client chose in-memory values when first imported, before `muse serve` set
        # PROMETHEUS_MULTIPROC_DIR: choose again (as metrics.py does in workers).
        values.ValueClass = values.get_value_class()
        self.restarts = Counter(
            "muse_worker_restarts", "Worker processes started again after they died.", registry=None
        )

    def _init_shared_socket(self) -> None:
        if self.workers == 1 or self.bind_uds or migrates_queued_connections():
            super()._init_shared_socket()
            return
        self._shd = SocketSpec(self.bind_addr, self.bind_port, self.backlog).build()
        self._sfd = self._shd.get_fd()
        self._ssp = None
        self._sso = socket.socket(fileno=self._sfd)
        self._sso.set_inheritable(True)

    def _respawn_workers(self, workers: Any, spawn_target: Any, target_loader: Any, delay: float = 0) -> Any:
        for idx in workers:
            worker = self.wrks[idx]
            if worker.is_alive():  # a reload or lifetime respawn, not a failure
                continue
            code = worker.inner.exitcode
            cause = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit {code}"
            log.error(
                "worker %d (pid %s) died (%s); starting a new one",
                idx + 1,
                worker.inner.pid,
                cause,
                extra={"event": "worker_died", "worker": idx + 1, "pid": worker.inner.pid, "cause": cause},
            )
            multiprocess.mark_process_dead(worker.inner.pid)
            self.restarts.inc()
        return super()._respawn_workers(workers, spawn_target, target_loader, delay)


def migrates_queued_connections() -> bool:
    try:
        return pathlib.Path("/proc/sys/net/ipv4/tcp_migrate_req").read_text().strip() == "1"
    except OSError:
        return False
