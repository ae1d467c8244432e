"""The registry's event outbox: events are written in the transaction of the change they
announce and sent to the event log after it commits, so an outage delays them, never loses them.
"""

from __future__ import annotations

from typing import Protocol

from carrara.errors import UnavailableError
from carrara.registry.util import now_iso
from carrara.sql import Database, Transaction

__all__ = ["EventPublisher", "OutboxMixin", "enqueue_event"]


class EventPublisher(Protocol):
    """The part of ``carrara.eventlog.EventLog`` the registry needs."""

    def append(self, topic: str, payload: bytes) -> str: ...


def enqueue_event(tx: Transaction, topic: str, payload: str) -> None:
    """Record an event in ``tx``; ``publish_pending`` sends it once ``tx`` has committed."""
    tx.execute(
        "INSERT INTO registry_outbox (topic, payload, created_at) VALUES (?, ?, ?)",
        (topic, payload, now_iso()),
    )


class OutboxMixin:
    """Sends recorded events to ``events`` (nothing is sent while it is None)."""

    db: Database
    events: EventPublisher | None

    def publish_pending(self) -> int:
        """Send deployment events not yet on the event log; returns how many were sent.

        Events are written in the deployment's transaction (an outbox) and sent after it
        commits, so a crash or an event-log outage delays them but never loses them.
        """
        if self.events is None:
            return 0
        with self.db.transaction() as tx:
            rows = tx.fetchall(
                "SELECT event_id, topic, payload FROM registry_outbox WHERE published_at IS NULL"
                " ORDER BY event_id"
            )
        sent = 0
        for event_id, topic, payload in rows:
            try:
                self.events.append(topic, payload.encode())
            except Exception as exc:
                raise UnavailableError(
                    f"event {event_id} on topic {topic!r} is recorded but not yet published "
                    f"({exc}); gateways will see it once the event log is back — retry with "
                    "publish_pending() (carrara models publish)"
                ) from exc
            with self.db.transaction() as tx:
                tx.execute(
                    "UPDATE registry_outbox SET published_at = ? WHERE event_id = ?",
                    (now_iso(), event_id),
                )
            sent += 1
        return sent
