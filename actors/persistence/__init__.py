"""The persistence actor: the only code that touches the database.

It applies operation events to ``volume_operations`` and ``device_mappings`` (forward-only,
idempotent, batched), serves the ``volumed`` micro service's queries and health, and
answers CloudStack credential requests from ``ossea_configs``.
"""

from actors.persistence.actor import PersistenceActor
from actors.persistence.store import Store, open_store

__all__ = ["PersistenceActor", "Store", "open_store"]
