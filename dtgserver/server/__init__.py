"""The Trio TCP server: sessions, result codes, metrics, and the multi-process supervisor."""
