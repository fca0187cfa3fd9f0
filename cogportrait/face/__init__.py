"""Face signals: detection, landmarks, head pose, gaze, AU proxies, face model, inversion, mapping layer.

Modules: ``landmarker`` (MediaPipe FaceLandmarker, VIDEO mode), ``extract`` (one clip -> frames
rows), ``proxies`` and ``au_backends`` (AU/gaze proxies, pluggable), ``pose`` (head pose from the
matrix, pose normalisation, lid geometry), ``signals`` (one clip's pose-normalised signals),
``model`` (the fitted linear basis and identity baselines), ``fitting`` (baselines, ridge fit,
leave-one-clip-out scores and quality gates over a dataset), ``inversion`` (bounded solve, AU41
over time), ``mapping`` (Π: controls -> keypoints), ``flame`` (FLAME conversion and fitting),
``model_files`` (the bundled model files, sha256-checked).
"""
