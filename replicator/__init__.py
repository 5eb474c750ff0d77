"""replicator: continuous page-level replication of SQLite databases, with verified restore."""

__version__ = "0.1.0"
