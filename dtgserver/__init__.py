"""dtgserver: an ingestion server for Korean DTG/OBD/MDT terminals (Triphos DTG Upload Protocol v0.5)."""

__version__ = "0.1.0"
