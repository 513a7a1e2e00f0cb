"""Leader election on a coordination.k8s.io Lease, as Kubernetes' own controllers do it.

Several operator replicas run; the one holding the Lease reconciles, the others
wait. The holder renews the Lease every ``retry_period``; a candidate takes it
over once it has seen no renewal for ``lease_duration`` (measured on its own
monotonic clock from when it last saw the record change, so clock skew between
nodes does not matter). A leader that cannot renew within ``renew_deadline``
has lost the Lease and must stop at once (``on_lost``): another replica may be
leading already. A leader that stops on purpose releases the Lease, so a
standby takes over within a ``retry_period`` instead of a ``lease_duration``.

Every update carries the Lease's ``resourceVersion``: two candidates racing
for an expired Lease cannot both win (the loser's update is refused with 409).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("kubetune.leader")


@dataclass
class LeaderElection:
    api: k8s.ApiClient
    namespace: str
    name: str
    identity: str
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    _observed: tuple[Any, ...] | None = field(default=None, init=False)
    _observed_at: float = field(default=0.0, init=False)
    _leading: bool = field(default=False, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _renewer: threading.Thread | None = field(default=None, init=False)
    _renewed_at: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if not self.lease_duration > self.renew_deadline > self.retry_period > 0:
            raise ValueError("leader election needs lease_duration > renew_deadline > retry_period > 0")

    @property
    def coordination(self) -> k8s.CoordinationV1Api:
        return k8s.CoordinationV1Api(self.api)

    @property
    def _timeout(self) -> float:
        """Per request: a hung call must end well before the renew deadline."""
        return self.retry_period

    @property
    def leading(self) -> bool:
        return self._leading

    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Block until this replica holds the Lease (True), or ``stop`` is set (False)."""
        announced = False
        while not (stop is not None and stop.is_set()):
            try:
                if self._try_acquire_or_renew():
                    log.info("%s: leading (Lease %s/%s)", self.identity, self.namespace, self.name)
                    return True
            except ApiException as e:
                log.warning("Lease %s/%s: %s %s", self.namespace, self.name, e.status, e.reason)
            if not announced:
                holder = self._observed[0] if self._observed else None
                log.info("%s: standing by; Lease %s/%s is held by %s", self.identity, self.namespace, self.name, holder)
                announced = True
            if stop is not None:
                stop.wait(self.retry_period)
            else:
                time.sleep(self.retry_period)
        return False

    def keep(self, on_lost: Callable[[], None]) -> None:
        """Renew the Lease in a background thread; call ``on_lost`` if it cannot be renewed in time.

        A watchdog thread, not the renewer, decides that the Lease is lost: a renewal whose request
        hangs (an API server that stopped answering) must not keep this replica leading after a
        standby has taken over. Renewal requests time out too, after ``retry_period``.
        """
        self._renewed_at = time.monotonic()

        def renew() -> None:
            while not self._stop.wait(self.retry_period):
                try:
                    ok = self._try_acquire_or_renew()
                except ApiException as e:
                    log.warning("renewing Lease %s/%s: %s %s", self.namespace, self.name, e.status, e.reason)
                    ok = False
                except Exception as e:  # an unreachable API server, a timed-out request
                    log.warning("renewing Lease %s/%s: %s", self.namespace, self.name, e)
                    ok = False
                if ok:
                    self._renewed_at = time.monotonic()

        def watch() -> None:
            while not self._stop.wait(min(0.5, self.retry_period / 2)):
                if time.monotonic() - self._renewed_at > self.renew_deadline:
                    with self._lock:
                        self._leading = False
                    if not self._stop.is_set():
                        log.error("%s: lost the Lease %s/%s", self.identity, self.namespace, self.name)
                        on_lost()
                    return

        self._renewer = threading.Thread(target=renew, name="lease-renewer", daemon=True)
        self._renewer.start()
        threading.Thread(target=watch, name="lease-watchdog", daemon=True).start()

    def release(self) -> None:
        """Stop renewing and hand the Lease back (holder cleared), if this replica holds it."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=self.retry_period * 2)
        with self._lock:
            if not self._leading:
                return
            self._leading = False
        try:
            lease = self.coordination.read_namespaced_lease(self.name, self.namespace, _request_timeout=self._timeout)
            if lease.spec is None or lease.spec.holder_identity != self.identity:
                return
            lease.spec.holder_identity = None
            lease.spec.lease_duration_seconds = 1
            lease.spec.renew_time = datetime.now(UTC)
            self.coordination.replace_namespaced_lease(self.name, self.namespace, lease, _request_timeout=self._timeout)
            log.info("%s: released the Lease %s/%s", self.identity, self.namespace, self.name)
        except ApiException as e:
            log.warning("releasing Lease %s/%s: %s %s", self.namespace, self.name, e.status, e.reason)

    def _try_acquire_or_renew(self) -> bool:
        now = datetime.now(UTC)
        coordination = self.coordination
        try:
            lease = coordination.read_namespaced_lease(self.name, self.namespace, _request_timeout=self._timeout)
        except ApiException as e:
            if e.status != 404:
                raise
            first = self._spec(now, now, transitions=0)
            body = k8s.V1Lease(metadata=k8s.V1ObjectMeta(name=self.name, namespace=self.namespace), spec=first)
            try:
                coordination.create_namespaced_lease(self.namespace, body, _request_timeout=self._timeout)
            except ApiException as e2:
                if e2.status == 409:
                    return False  # another candidate created it first
                raise
            return self._won(first)
        spec = lease.spec or k8s.V1LeaseSpec()
        record = (spec.holder_identity, spec.renew_time, spec.lease_transitions, spec.lease_duration_seconds)
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        holder = spec.holder_identity
        duration = float(spec.lease_duration_seconds or self.lease_duration)
        if holder and holder != self.identity and time.monotonic() < self._observed_at + duration:
            return False  # held by another replica, which renewed it recently
        if holder == self.identity:
            mine = self._spec(spec.acquire_time or now, now, transitions=spec.lease_transitions or 0)
        else:
            mine = self._spec(now, now, transitions=(spec.lease_transitions or 0) + 1)
        lease.spec = mine
        try:
            coordination.replace_namespaced_lease(  # carries resourceVersion
                self.name, self.namespace, lease, _request_timeout=self._timeout
            )
        except ApiException as e:
            if e.status == 409:
                return False  # someone else updated it since we read it
            raise
        return self._won(mine)

    def _spec(self, acquired: datetime, renewed: datetime, *, transitions: int) -> k8s.V1LeaseSpec:
        return k8s.V1LeaseSpec(
            holder_identity=self.identity,
            lease_duration_seconds=max(1, round(self.lease_duration)),
            acquire_time=acquired,
            renew_time=renewed,
            lease_transitions=transitions,
        )

    def _won(self, spec: k8s.V1LeaseSpec) -> bool:
        self._observed = (spec.holder_identity, spec.renew_time, spec.lease_transitions, spec.lease_duration_seconds)
        self._observed_at = time.monotonic()
        with self._lock:
            self._leading = True
        return True
