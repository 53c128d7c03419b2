"""What every endpoint reaches: the server's state (settings, registry, metrics,
keys, what is being served) and the steps the endpoints share (authenticate,
find the tenant's lane, score, count errors).  Every failure a client can cause
is an HTTPError with a 4xx status and the JSON path of the field at fault."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from muse.calib.names import TENANT_RULE, tenant_problem
from muse.compile import Scores
from muse.core.deploy import GenerationConflict
from muse.core.objectstore import StoreError
from muse.core.registry import Registry
from muse.core.snapshot import RouteError, Snapshot
from muse.core.spec import SpecError

from .asgi import Request
from .auth import Authenticator, AuthError, Principal, keys_path
from .errors import REASONS, HTTPError, check_version, no_route, not_ready
from .lanes import Lane
from .metrics import Metrics
from .quotas import Quotas
from .routes import RouteTable
from .scorelog import ScoreLog
from .serving import Serving
from .settings import Settings

log = logging.getLogger("muse.serve")


class Context:
    def __init__(self, settings: Settings, routes: RouteTable):
        self.settings = settings
        self.routes = routes  # what the app dispatches, and what /openapi.json documents
        self.registry = Registry(settings.registry)
        self.metrics = Metrics(tenant_labels=settings.tenant_labels)
        self.quotas = Quotas(settings.workers)
        self.auth = Authenticator(keys_path(self.registry.root), required=settings.auth)
        score_log = None
        if settings.score_log is not None:
            score_log = ScoreLog(
                settings.score_log,
                sample=settings.score_log_sample,
                max_bytes=settings.score_log_max_bytes,
                flush_seconds=settings.score_log_flush_seconds,
            )
        self.serving = Serving(
            self.registry,
            self.metrics,
            settings.poll_interval,
            settings.shadow_queue,
            score_log=score_log,
            on_poll=self.auth.reload,
        )  # added and revoked keys apply within a poll
        # large bodies' rows, off the loop; never shut down: a request still in flight at shutdown
        # may need it, and its idle thread ends with the process
        self._parser = ThreadPoolExecutor(1, thread_name_prefix="muse-json")

    # -- steps the endpoints share ---------------------------------------------------
    def authenticate(self, req: Request) -> Principal:
        try:
            principal = self.auth.authenticate(req.headers)
        except AuthError as exc:
            raise HTTPError(exc.status, str(exc), "authorization", [(b"www-authenticate", b"Bearer")]) from None
        req.key_id = principal.key_id
        return principal

    def authenticate_scorer(self, req: Request) -> Principal:
        """The request's principal, if it may score or read model metadata (a metrics key may not)."""
        principal = self.authenticate(req)
        if principal.metrics:
            raise HTTPError(403, "this key may only read /metrics", "authorization")
        return principal

    def snapshot(self) -> Snapshot:
        snap = self.serving.snapshot
        if snap is None:
            raise not_ready()
        return snap

    def lane(self, tenant: str, intent: str, version: str | None, intent_field: str) -> Lane:
        """The lane serving (tenant, intent), or the 404/503 that says why there is none."""
        try:
            lane = self.serving.lane(tenant, intent)
        except RouteError as exc:
            raise no_route(exc, self.snapshot(), intent, intent_field) from None
        if lane is None:
            raise not_ready()
        check_version(lane.predictor, intent, version)
        return lane

    @staticmethod
    def check_tenant(principal: Principal, tenant: object, field: str) -> None:
        """422 unless ``tenant`` is a tenant name (muse.calib.names), 403 unless the key may
        score for it.  Only then may it become a metrics label or a score-log value."""
        if tenant == principal.tenant:
            return  # the key's own tenant: checked when the key was added
        problem = tenant_problem(tenant)
        if problem is not None:
            shown = repr(tenant) if not isinstance(tenant, str) or len(tenant) <= 40 else repr(tenant[:40]) + "..."
            raise HTTPError(422, f"{shown} is not a tenant name ({problem}); use {TENANT_RULE} - at `{field}`", field)
        if principal.tenant is not None:
            raise HTTPError(
                403, f"this key belongs to tenant {principal.tenant!r} and cannot score for {tenant!r}", field
            )

    def check_json_size(self, size: int, field: str) -> None:
        limit = self.settings.max_json_bytes
        if size > limit:
            raise HTTPError(
                413,
                f"a JSON body of {size:,} bytes is over the {limit:,} decoded on the event loop (--max-json-bytes): "
                "send the rows as a binary tensor (Open Inference Protocol binary extension), or in several requests",
                field,
            )

    def _current_quotas(self) -> Quotas:
        """The quotas of the generation being served (taken up at its first request)."""
        snap = self.serving.snapshot
        if snap is not None and snap.generation != self.quotas.generation:
            self.quotas.configure(snap.spec.quotas, snap.generation)
        return self.quotas

    def check_quota(self, tenant: str, field: str) -> None:
        """429 now, before the body is read, if ``tenant`` (named by its key) is over quota."""
        self._current_quotas().check(tenant, field)

    async def score_within_quota(self, lane: Lane, X: np.ndarray, field: str) -> Scores:
        """``lane.score(X)`` within its tenant's quota: 429 (rows counted as refused) if over it,
        else the rows are in flight until answered, and wait at the model by the tenant's weight."""
        tenant, rows = lane.tenant, len(X)
        quotas = self._current_quotas()
        try:
            admitted = quotas.admit(tenant, rows, field)
        except HTTPError:
            self.metrics.rejected_rows.labels(self.metrics.tenant_label(tenant), lane.predictor.intent).inc(rows)
            raise
        try:
            return await lane.score(X, admitted.limits.weight)
        finally:
            quotas.release(admitted, rows)

    def count_error(self, exc: HTTPError, tenant: str, intent: str, predictor: str) -> None:
        """Count a refused scoring request.  Labels name only what is served: a request refused
        for its credential (401/403) is counted with no tenant, intent or predictor (whatever it
        named is the client's choice), and an intent that is not served counts as ''."""
        if exc.status in (401, 403):
            tenant = intent = predictor = ""
        elif intent:
            snap = self.serving.snapshot
            if snap is None or intent not in snap.intents:
                intent = ""
        self.metrics.observe_error(tenant, intent, predictor, exc.status, REASONS.get(exc.status, "error"))

    def admin(self, req: Request) -> None:
        if not self.authenticate(req).admin:
            off = "" if self.settings.auth else " (auth is off for scoring, not for the admin API)"
            raise HTTPError(403, f"the admin API needs an admin key{off}: `muse keys add --admin`", "authorization")

    def metrics_reader(self, req: Request) -> None:
        """/metrics names every tenant and predictor: with --metrics-auth, only for admin and
        metrics keys."""
        if self.settings.metrics_auth:
            principal = self.authenticate(req)
            if not (principal.admin or principal.metrics):
                raise HTTPError(
                    403, "/metrics needs an admin or metrics key: `muse keys add --metrics`", "authorization"
                )

    async def off_loop(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the parsing thread: for work that releases the GIL (server/_rows.pyx),
        so that the loop serves other requests meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self._parser, fn, *args)

    async def in_loader(self, fn: Any, *args: Any) -> Any:
        """Deployment work on the background thread; a refused deployment is a 422."""
        try:
            return await self.serving.in_background(fn, *args)
        except GenerationConflict as exc:  # derived from a generation that another publish replaced
            raise HTTPError(409, f"{exc}; retry against the current generation", "$") from None
        except SpecError as exc:
            raise HTTPError(422, str(exc), "$") from None
        except StoreError as exc:  # a registry on object storage that cannot be reached or refused
            raise HTTPError(503, f"{exc}; nothing was published", "$") from None
