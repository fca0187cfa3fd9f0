"""Face signals: detection, landmarks, head pose, gaze, AU proxies, face model, inversion, mapping layer."""
