"""The model registry: versions with lineage, gated promotion, approvals, deployments, audit.

Every write is one database transaction that first locks the model's row (``FOR UPDATE`` on
PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` serializes writers), so version numbers are assigned
without gaps or duplicates and a model never has two PRODUCTION versions or two active
deployments. Roles are checked here, so the REST API and embedded callers obey the same rules.

``ModelRegistry`` is the one class users construct; each concern lives in its own module as a
mixin over the same database: ``models`` (models, versions, registration, lineage),
``promotion`` (evaluations, approvals, promote, archive), ``deploying`` (deploy, rollback),
``outbox`` (event publishing) and ``audit``; ``records`` holds the lookups they share.
"""

from __future__ import annotations

from pathlib import Path

from carrara.registry.artifacts import ArtifactStore
from carrara.registry.auth import TokenStore
from carrara.registry.deploying import DeploymentsMixin
from carrara.registry.migrations import migrate
from carrara.registry.outbox import EventPublisher
from carrara.registry.promotion import Evaluator, PromotionMixin
from carrara.sql import Database, connect

__all__ = ["EventPublisher", "Evaluator", "ModelRegistry"]


# PromotionMixin builds on ModelsMixin, and both it and DeploymentsMixin on AuditMixin, so
# this order is the one method resolution accepts; no two mixins define the same method.
class ModelRegistry(PromotionMixin, DeploymentsMixin):
    """Registered models and versions over one database and one artifact store."""

    def __init__(
        self,
        db: Database,
        artifacts: ArtifactStore,
        *,
        events: EventPublisher | None = None,
        evaluator: Evaluator | None = None,
        owns_db: bool = False,
    ) -> None:
        self.db = db
        self.artifacts = artifacts
        self.events = events
        self.evaluator = evaluator
        self.tokens = TokenStore(db)
        self._owns_db = owns_db

    @classmethod
    def open(
        cls,
        url: str,
        artifact_root: str | Path,
        *,
        events: EventPublisher | None = None,
        evaluator: Evaluator | None = None,
        upgrade: bool = True,
    ) -> ModelRegistry:
        """Open (and by default migrate) the registry at ``url``; ``close()`` closes the DB."""
        db = connect(url)
        try:
            if upgrade:
                migrate(db)
        except BaseException:
            db.close()
            raise
        return cls(
            db, ArtifactStore(artifact_root), events=events, evaluator=evaluator, owns_db=True
        )

    def close(self) -> None:
        """Close the database if this registry opened it."""
        if self._owns_db:
            self.db.close()

    def __enter__(self) -> ModelRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
