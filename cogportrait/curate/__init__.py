"""Curation maths and models (Ray-free): manifest, scenes, face tracking, filters, crop."""
