"""Face signals: detection, landmarks, head pose, gaze, AU proxies, face model, inversion, mapping layer.

Modules: ``landmarker`` (MediaPipe FaceLandmarker, VIDEO mode), ``extract`` (one clip -> frames
rows), ``proxies`` and ``au_backends`` (AU/gaze proxies, pluggable), ``pose`` (head pose from the
matrix, pose normalisation, lid geometry), ``model`` (the fitted linear basis and identity
baselines), ``inversion`` (bounded solve, AU41 over time), ``mapping`` (Π: controls -> keypoints),
``library`` (clip-level steps of the invert job), ``flame`` (FLAME conversion and fitting),
``models`` (local model files).
"""
