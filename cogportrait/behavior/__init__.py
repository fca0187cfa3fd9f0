"""Behaviour over time (Ray-free): events, prototype segmentation, KTO mining rules, and reading a
clip's controls/events/keypoints back from the invert stage's tables (``sources``)."""
