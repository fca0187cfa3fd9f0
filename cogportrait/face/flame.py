"""The ``flame`` face-model backend: FLAME (licence-gated, never downloaded here) fitted to the keypoints.

Two parts:

* ``convert_flame`` — **the only code in this project that reads a pickle.** FLAME ships as a
  Python 2 pickle (``generic_model.pkl``, arrays partly wrapped in chumpy objects). The user runs
  ``cogportrait face convert-flame model.pkl embedding.npz OUT.npz`` once on their own licensed
  file; it is read with a restricted unpickler that only rebuilds numpy arrays, scipy sparse
  matrices and chumpy array wrappers (no other class or function can be called), and written as
  a plain ``.npz`` (``allow_pickle=False`` from then on).
* ``FlameModel`` / ``FlameFitter`` — load that ``.npz`` and fit expression coefficients and eye
  pose to pose-normalised keypoints (the alternative to the default linear face model).

FLAME layout used: v_template (V x 3), shapedirs (V x 3 x (n_shape + n_expr)), posedirs
(V x 3 x 36), J_regressor (5 x V, sparse), weights (V x 5), kintree_table (2 x 5), f (F x 3);
joints: 0 global, 1 neck, 2 jaw, 3 left eye, 4 right eye. The MediaPipe landmark embedding
(``mediapipe_landmark_embedding.npz``) gives, per MediaPipe landmark index, a FLAME face and
barycentric coordinates: lmk_face_idx (L), lmk_b_coords (L x 3), landmark_indices (L).
"""

from __future__ import annotations

import io
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cogportrait.io.atomic import atomic_path
from cogportrait.schema import KEYPOINT_INDICES

log = logging.getLogger("cogportrait.face.flame")

FLAME_NPZ_VERSION = 1
N_JOINTS = 5
EYE_JOINTS = (3, 4)  # FLAME: left eye, right eye (the subject's)


class _ArrayWrapperStub:
    """Stands in for chumpy's Ch while unpickling: keeps the wrapped array, runs nothing."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.state: object = None

    def __setstate__(self, state: object) -> None:
        self.state = state

    def array(self) -> np.ndarray:
        state = self.state
        if isinstance(state, dict):
            for key in ("x", "_x", "r", "a"):
                if key in state and isinstance(state[key], np.ndarray):
                    return state[key]
            arrays = [v for v in state.values() if isinstance(v, np.ndarray)]
            if len(arrays) == 1:
                return arrays[0]
        raise ValueError("a chumpy object in the FLAME file holds no plain array")


class _SparseStub:
    """Stands in for scipy.sparse matrices while unpickling; rebuilt as a dense array after."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.state: dict = {}

    def __setstate__(self, state: dict) -> None:
        self.state = dict(state)

    def dense(self) -> np.ndarray:
        import scipy.sparse as sp

        s = self.state
        shape = s.get("_shape") or s.get("shape")
        fmt = s.get("format", "csc")
        cls = {"csc": sp.csc_matrix, "csr": sp.csr_matrix}.get(fmt)
        if cls is None or shape is None:
            raise ValueError(f"unsupported sparse matrix in the FLAME file (format {fmt!r})")
        return np.asarray(cls((s["data"], s["indices"], s["indptr"]), shape=tuple(shape)).todense())


def _object_reconstructor(cls: type, base: type, state: object) -> object:
    """copyreg._reconstructor restricted to our stub classes."""
    if cls not in (_ArrayWrapperStub, _SparseStub):
        raise pickle.UnpicklingError(f"refusing to build {cls!r} from the FLAME file")
    return cls.__new__(cls)


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and the stubs above; any other global is refused."""

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle protocol
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
            return getattr(np._core.multiarray, name) if hasattr(np, "_core") else getattr(np.core.multiarray, name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module.startswith("chumpy"):
            return _ArrayWrapperStub
        if module.startswith("scipy.sparse") and name in ("csc_matrix", "csr_matrix"):
            return _SparseStub
        if module in ("copy_reg", "copyreg") and name == "_reconstructor":
            return _object_reconstructor
        if module in ("__builtin__", "builtins") and name in ("object", "set", "frozenset"):
            return {"object": object, "set": set, "frozenset": frozenset}[name]
        if module == "_codecs" and name == "encode":  # how protocol-2 pickles carry bytes
            import codecs

            return codecs.encode
        raise pickle.UnpicklingError(f"refusing global {module}.{name} in the FLAME file (only arrays are allowed)")


def _as_array(value: object) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, _ArrayWrapperStub):
        return np.asarray(value.array())
    if isinstance(value, _SparseStub):
        return value.dense()
    return np.asarray(value)


def read_flame_pickle(path: str | Path) -> dict[str, np.ndarray]:
    """Read a FLAME model pickle with the restricted unpickler (arrays only)."""
    log.warning("reading a pickle: %s (FLAME model conversion, restricted to arrays)", path)
    data = Path(path).read_bytes()
    raw = _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a dict of arrays, got {type(raw).__name__}")
    return {str(k): _as_array(v) for k, v in raw.items() if k in ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table", "f")}


def convert_flame(model_pkl: str | Path, embedding_npz: str | Path, out_npz: str | Path, n_shape: int = 300) -> dict:
    """FLAME pickle + MediaPipe landmark embedding -> one pickle-free .npz for ``FlameModel``."""
    m = read_flame_pickle(model_pkl)
    missing = {"v_template", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table", "f"} - set(m)
    if missing:
        raise ValueError(f"{model_pkl} lacks FLAME field(s) {sorted(missing)}")
    with np.load(embedding_npz, allow_pickle=False) as z:
        emb = {k: z[k] for k in ("lmk_face_idx", "lmk_b_coords", "landmark_indices")}
    v = m["v_template"].astype(np.float64)
    dirs = m["shapedirs"].astype(np.float64)
    if dirs.ndim != 3 or dirs.shape[:2] != v.shape or dirs.shape[2] <= n_shape:
        raise ValueError(f"shapedirs {dirs.shape} does not hold {n_shape} shape + expression components for {v.shape[0]} vertices")
    arrays = {
        "version": np.array(FLAME_NPZ_VERSION),
        "v_template": v,
        "shapedirs": dirs[:, :, :n_shape],
        "exprdirs": dirs[:, :, n_shape:],
        "posedirs": m["posedirs"].astype(np.float64),
        "J_regressor": m["J_regressor"].astype(np.float64),
        "weights": m["weights"].astype(np.float64),
        "kintree_table": m["kintree_table"].astype(np.int64),
        "faces": m["f"].astype(np.int64),
        "lmk_face_idx": emb["lmk_face_idx"].astype(np.int64),
        "lmk_b_coords": emb["lmk_b_coords"].astype(np.float64),
        "landmark_indices": emb["landmark_indices"].astype(np.int64),
    }
    FlameModel(arrays)  # validate before writing
    with atomic_path(out_npz, ".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    covered = sorted(set(arrays["landmark_indices"].tolist()) & set(KEYPOINT_INDICES))
    return {"out": str(out_npz), "vertices": int(v.shape[0]), "shape_components": int(n_shape),
            "expression_components": int(dirs.shape[2] - n_shape), "landmarks": int(len(arrays["landmark_indices"])),
            "keypoints_covered": len(covered)}


def _rodrigues(aa: np.ndarray) -> np.ndarray:
    """Axis-angle (… x 3) -> rotation matrices (… x 3 x 3)."""
    theta = np.linalg.norm(aa, axis=-1, keepdims=True)
    k = aa / np.where(theta > 1e-12, theta, 1.0)
    kx = np.zeros(aa.shape[:-1] + (3, 3))
    kx[..., 0, 1], kx[..., 0, 2] = -k[..., 2], k[..., 1]
    kx[..., 1, 0], kx[..., 1, 2] = k[..., 2], -k[..., 0]
    kx[..., 2, 0], kx[..., 2, 1] = -k[..., 1], k[..., 0]
    s, c = np.sin(theta)[..., None], np.cos(theta)[..., None]
    return np.eye(3) + s * kx + (1 - c) * (kx @ kx)


class FlameModel:
    """A converted FLAME model; evaluates the MediaPipe-embedded landmarks for given parameters."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        if int(arrays.get("version", -1)) != FLAME_NPZ_VERSION:
            raise ValueError("not a converted FLAME file (run `cogportrait face convert-flame`)")
        self.v_template = arrays["v_template"]
        self.shapedirs = arrays["shapedirs"]
        self.exprdirs = arrays["exprdirs"]
        self.posedirs = arrays["posedirs"]
        self.j_regressor = arrays["J_regressor"]
        self.weights = arrays["weights"]
        self.faces = arrays["faces"]
        v = self.v_template.shape[0]
        if self.j_regressor.shape != (N_JOINTS, v) or self.weights.shape != (v, N_JOINTS):
            raise ValueError(f"J_regressor {self.j_regressor.shape} / weights {self.weights.shape} do not match {v} vertices")
        if self.posedirs.shape != (v, 3, (N_JOINTS - 1) * 9):
            raise ValueError(f"posedirs {self.posedirs.shape}: expected ({v}, 3, 36)")
        lmk = arrays["landmark_indices"]
        pos = {int(m): i for i, m in enumerate(lmk)}
        self.keypoint_rows = np.array([k for k, m in enumerate(KEYPOINT_INDICES) if m in pos], dtype=np.int64)
        order = [pos[KEYPOINT_INDICES[k]] for k in self.keypoint_rows]
        self.lmk_faces = arrays["lmk_face_idx"][order]
        self.lmk_bary = arrays["lmk_b_coords"][order]
        if not len(self.keypoint_rows):
            raise ValueError("the landmark embedding covers none of the 62 keypoints")
        # landmarks need only the vertices of their faces and those the eye joints regress from:
        # fitting works on that sub-mesh (a few hundred of FLAME's 5023 vertices)
        corners = np.unique(self.faces[self.lmk_faces])
        joint_src = np.flatnonzero(np.abs(self.j_regressor).sum(axis=0) > 0)
        keep = np.union1d(corners, joint_src)
        remap = -np.ones(v, dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        self._sub = {
            "v_template": self.v_template[keep], "exprdirs": self.exprdirs[keep],
            "posedirs": self.posedirs[keep], "weights": self.weights[keep], "j_regressor": self.j_regressor[:, keep],
            "corners": remap[self.faces[self.lmk_faces]],
        }

    @staticmethod
    def load(path: str | Path) -> FlameModel:
        with np.load(path, allow_pickle=False) as z:
            return FlameModel({k: z[k] for k in z.files})

    @property
    def n_expr(self) -> int:
        return self.exprdirs.shape[2]

    def vertices(self, expr: np.ndarray, eye_pose: np.ndarray, shape: np.ndarray | None = None) -> np.ndarray:
        """(T x V x 3) vertices; expr T x n_expr, eye_pose T x 2 x 3 axis-angle (global/neck/jaw at rest)."""
        return _skin(self.v_template, self.exprdirs, self.shapedirs, self.posedirs, self.weights, self.j_regressor,
                     expr, eye_pose, shape)

    def landmarks(self, expr: np.ndarray, eye_pose: np.ndarray, shape: np.ndarray | None = None) -> np.ndarray:
        """(T x K x 3) keypoints covered by the embedding, in ``keypoint_rows`` order."""
        sub = self._sub
        if shape is not None:  # identity shape: evaluate on the full mesh (rare; fitting keeps it at zero)
            v = self.vertices(expr, eye_pose, shape)
            tri = v[:, self.faces[self.lmk_faces]]
        else:
            v = _skin(sub["v_template"], sub["exprdirs"], None, sub["posedirs"], sub["weights"], sub["j_regressor"],
                      expr, eye_pose, None)
            tri = v[:, sub["corners"]]  # T x K x 3 (corners) x 3
        return np.einsum("tkcx,kc->tkx", tri, self.lmk_bary)


def _skin(v_template, exprdirs, shapedirs, posedirs, weights, j_regressor, expr, eye_pose, shape) -> np.ndarray:
    """FLAME vertices with global/neck/jaw at rest and the eyes rotated (linear blend skinning)."""
    t = len(expr)
    v = v_template[None] + np.einsum("vck,tk->tvc", exprdirs, expr)
    if shape is not None:
        v = v + np.einsum("vck,k->vc", shapedirs, shape)[None]
    joints = np.einsum("jv,tvc->tjc", j_regressor, v)
    rots = np.tile(np.eye(3), (t, N_JOINTS, 1, 1))
    rots[:, EYE_JOINTS[0]] = _rodrigues(eye_pose[:, 0])
    rots[:, EYE_JOINTS[1]] = _rodrigues(eye_pose[:, 1])
    feat = (rots[:, 1:] - np.eye(3)).reshape(t, -1)
    v = v + np.einsum("vck,tk->tvc", posedirs, feat)
    # the eyes are leaves of the kinematic tree and every other joint is at rest, so skinning
    # reduces to rotating each vertex's eye-weighted share about its eye joint
    out = v.copy()
    for j in EYE_JOINTS:
        w = weights[:, j][None, :, None]
        rotated = np.einsum("tij,tvj->tvi", rots[:, j], v - joints[:, j][:, None]) + joints[:, j][:, None]
        out = out + w * (rotated - v)
    return out


@dataclass
class FlameFit:
    expr: np.ndarray  # T x n_expr
    eye_pose: np.ndarray  # T x 2 x 3 axis-angle
    scale: float
    translation: np.ndarray  # 3
    residual: np.ndarray  # T, mean keypoint distance in target units


class FlameFitter:
    """Fit expression and eye pose to pose-normalised keypoints (Gauss-Newton, ridge on expression).

    The target frame (x toward the subject's left, y up, z toward the viewer) matches FLAME's. A
    similarity (scale, translation) maps FLAME metres onto the target units, fitted on the
    neutral model against the targets' median shape.
    """

    def __init__(self, model: FlameModel, ridge: float, iterations: int = 5) -> None:
        self.model = model
        self.ridge = ridge
        self.iterations = iterations

    def fit(self, target: np.ndarray) -> FlameFit:
        m = self.model
        y = np.asarray(target, dtype=np.float64)[:, m.keypoint_rows]  # T x K x 3
        t = len(y)
        neutral = m.landmarks(np.zeros((1, m.n_expr)), np.zeros((1, 2, 3)))[0]
        ref = np.median(y, axis=0)
        mu_n, mu_r = neutral.mean(axis=0), ref.mean(axis=0)
        scale = float(np.sqrt(((ref - mu_r) ** 2).sum() / max(((neutral - mu_n) ** 2).sum(), 1e-12)))
        trans = mu_r - scale * mu_n
        params = np.zeros((t, m.n_expr + 6))
        eps = 1e-4
        for _ in range(self.iterations):
            pred = self._predict(params, scale, trans)
            r = (y - pred).reshape(t, -1)
            jac = np.empty((t, r.shape[1], params.shape[1]))
            for p in range(params.shape[1]):
                step = params.copy()
                step[:, p] += eps
                jac[:, :, p] = ((self._predict(step, scale, trans) - pred).reshape(t, -1)) / eps
            jtj = np.einsum("tmp,tmq->tpq", jac, jac) + self.ridge * np.eye(params.shape[1])[None]
            jtr = np.einsum("tmp,tm->tp", jac, r)
            params = params + np.linalg.solve(jtj, jtr[:, :, None])[:, :, 0]
        pred = self._predict(params, scale, trans)
        res = np.linalg.norm(pred - y, axis=2).mean(axis=1)
        return FlameFit(params[:, : m.n_expr], params[:, m.n_expr :].reshape(t, 2, 3), scale, trans, res)

    def _predict(self, params: np.ndarray, scale: float, trans: np.ndarray) -> np.ndarray:
        m = self.model
        lm = m.landmarks(params[:, : m.n_expr], params[:, m.n_expr :].reshape(-1, 2, 3))
        return scale * lm + trans
