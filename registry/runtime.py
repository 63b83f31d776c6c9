"""What one running app holds: built by ``create_app``'s lifespan, never at import."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from registry.metrics import Metrics
from registry.retrieval.service import Retrieval
from registry.settings import Settings
from registry.storage import BlobStore, Staging


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: BlobStore
    staging: Staging
    metrics: Metrics
    retrieval: Retrieval
