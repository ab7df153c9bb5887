"""Tools around training: saved-bytes measurement, compact-memory, compact-plan and compact-export."""
