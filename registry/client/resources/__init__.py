"""The SDK's resources: one small class per part of the HTTP API v1, over one ``Transport``.

``Agora`` builds them and exposes each as an attribute (``agora.experts.submit(...)``);
its own methods (``agora.submit_expert(...)``) delegate to them.
"""

from registry.client.resources.audit import Audit
from registry.client.resources.bases import Bases
from registry.client.resources.compositions import Compositions, ExpertSpec
from registry.client.resources.evaluations import Evaluations
from registry.client.resources.experts import Experts
from registry.client.resources.jobs import Jobs
from registry.client.resources.moderation import Moderation
from registry.client.resources.monitoring import Monitoring
from registry.client.resources.reports import Reports
from registry.client.resources.retrieval import DEFAULT_TEMPERATURE, Retrieval
from registry.client.resources.tokens import Tokens

__all__ = [
    "DEFAULT_TEMPERATURE",
    "Audit",
    "Bases",
    "Compositions",
    "Evaluations",
    "ExpertSpec",
    "Experts",
    "Jobs",
    "Moderation",
    "Monitoring",
    "Reports",
    "Retrieval",
    "Tokens",
]
