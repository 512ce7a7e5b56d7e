"""Published FID reference statistics, read safely and checked; FID against them.

The papers' FID protocols compare the Inception statistics of generated images with reference
statistics published by the original authors.  Four file formats are read here; each gives a mean
``mu`` ``[D]`` and a covariance ``sigma`` ``[D, D]`` (Inception-v3 pool features: D = 2048).

``"edm-npz"`` -- EDM (Karras et al. 2022), NVlabs/edm ``fid.py``
    ``https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz`` (also ``ffhq-64x64.npz``,
    ``afhqv2-64x64.npz``, ``imagenet-64x64.npz``).  ``fid.py ref`` writes ``np.savez(dest, mu=mu,
    sigma=sigma)``: exactly the keys ``mu`` [2048] and ``sigma`` [2048, 2048] (float64, 1/(N-1)
    covariance), no image count.  Used by the CIFAR-10 protocols of DDO and discriminator guidance
    (DG's ``fid_npzs.py --ref=/stats/cifar10-32x32.npz``).

``"edm2-pkl"`` -- EDM2 (Karras et al. 2024), NVlabs/edm2 ``calculate_metrics.py``
    ``https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img64.pkl`` and ``.../img512.pkl``
    (used by DDO's ImageNet-64/512 protocol).  ``calculate_metrics.py ref`` saves with
    ``pickle.dump`` a *plain dict* ``{'num_images': int, 'fid': {'mu': ndarray [2048],
    'sigma': ndarray [2048, 2048]}, 'fd_dinov2': {'mu': [1024], 'sigma': [1024, 1024]}}`` (float64;
    one sub-dict per metric that was computed; its ``load_stats`` also accepts an EDM ``.npz``, as
    ``{'fid': dict(npz)}``).  It is read here as *data* with the restricted unpickler of
    :mod:`repro.storage.unpickle` -- numpy arrays inside dicts and nothing else; any other global is refused
    before it can run.  ``metric`` picks the sub-dict (default ``"fid"``); ``num_images`` becomes ``n``.

``"openai-npz"`` -- ADM / guided-diffusion (Dhariwal & Nichol 2021), openai/guided-diffusion
    ``evaluations/evaluator.py``
    ``https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz``
    (used for DG's ImageNet-256 results; the URL is in DDO's README).  Keys: ``arr_0`` = 10,000
    reference images (uint8 NHWC, for precision/recall; never loaded here), ``mu``/``sigma``
    (TF Inception ``pool_3``, D = 2048, statistics "over the whole dataset") and ``mu_s``/``sigma_s``
    (sFID: the first 7 channels of ``mixed_6/conv``, 17x17x7, D = 2023).  ``metric="fid"`` reads
    ``mu``/``sigma``, ``metric="sfid"`` reads ``mu_s``/``sigma_s``; the number of images behind the
    statistics is not stored (``n`` is None).

``"repro-npz"`` -- our own :meth:`repro.evaluation.fidelity.FeatureStats.save`: ``mu``, ``sigma``, ``n``
    (int64; 0 = unknown) and ``meta`` (a JSON string, parsed into ``meta``).

Every ``.npz`` is opened with ``np.load(..., allow_pickle=False)``; nothing is ever read with plain
``pickle.load``.  Checks (each a ``ValueError`` naming the file and the problem): readable file
(truncated/corrupt files are refused), the expected keys, ``mu`` 1-D and ``sigma`` square with the
same D (and D == ``dim`` when the caller passes one, e.g. ``dim=INCEPTION_DIM``), real numeric dtype,
all values finite, a non-negative diagonal, and a symmetric ``sigma``:
``max|sigma - sigma.T| <= SIGMA_SYMMETRY_RTOL * max|sigma|`` with ``SIGMA_SYMMETRY_RTOL = 1e-6``
(float64 covariances are symmetric to ~1e-15, float32-stored ones to ~1e-7).  With
``expected_sha256`` the file's digest is checked before a single byte is parsed.

Example::

    ref = load_reference("fid-refs/cifar10-32x32.npz", dim=INCEPTION_DIM,
                         expected_sha256="...")                 # kind inferred: "edm-npz"
    fid = fid_from_stats(gen.mu, gen.sigma, ref.mu, ref.sigma)  # gen: a repro.evaluation.fidelity.FeatureStats
    ref512 = load_reference("img512.pkl", metric="fid")         # kind inferred: "edm2-pkl"
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from repro.evaluation.fidelity import FeatureStats, frechet_distance
from repro.storage.unpickle import UnsafePickleError, read_edm_pickle

__all__ = [
    "KINDS",
    "INCEPTION_DIM",
    "SIGMA_SYMMETRY_RTOL",
    "ReferenceStats",
    "infer_kind",
    "load_reference",
    "fid_from_stats",
]

KINDS = ("edm-npz", "edm2-pkl", "openai-npz", "repro-npz")
INCEPTION_DIM = 2048
SIGMA_SYMMETRY_RTOL = 1e-6

# Keys of each format (facts about the upstream writers; see the module docstring).
_EDM_KEYS = {"mu", "sigma"}
_OPENAI_KEYS = {"mu", "sigma", "mu_s", "sigma_s"}
_OPENAI_METRICS = {"fid": ("mu", "sigma"), "sfid": ("mu_s", "sigma_s")}

# What a damaged file raises inside np.load / the unpickler (all turned into a ValueError naming the file).
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError,
                zipfile.BadZipFile, zlib.error, pickle.UnpicklingError, struct.error, UnicodeDecodeError,
                json.JSONDecodeError, RecursionError, MemoryError)


@dataclass
class ReferenceStats:
    """Reference statistics read from a file: ``mu`` ``[D]``, ``sigma`` ``[D, D]`` (float64, as written).

    ``n``: the number of images behind the statistics when the file says so (repro ``n``, EDM2
    ``num_images``), else None.  ``meta``: the file's own metadata (repro-npz ``meta``) plus what was
    learned while reading (``available``: the other metrics/keys in the file).  ``kind``, ``path``,
    ``metric`` and ``sha256`` (None unless it was checked) say where the numbers came from.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: Optional[int]
    meta: dict = field(default_factory=dict)
    kind: str = ""
    path: str = ""
    metric: str = "fid"
    sha256: Optional[str] = None

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    def to_feature_stats(self) -> FeatureStats:
        """A frozen :class:`repro.evaluation.fidelity.FeatureStats` with exactly these ``mu``/``sigma``."""
        meta = dict(self.meta)
        meta.update(reference_kind=self.kind, reference_file=os.path.basename(self.path),
                    reference_metric=self.metric, reference_n=self.n)
        return FeatureStats.from_dict({"mu": self.mu, "sigma": self.sigma, "meta": meta})


def _fail(path: Path, problem: str) -> ValueError:
    return ValueError(f"reference statistics {path}: {problem}")


def _sniff(path: Path) -> str:
    """'npz' or 'pkl' from the extension, else from the first bytes."""
    ext = path.suffix.lower()
    if ext == ".npz":
        return "npz"
    if ext in (".pkl", ".pickle"):
        return "pkl"
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        return "npz"
    if head[:1] == b"\x80":
        return "pkl"
    raise _fail(path, f"cannot tell the format from the extension {ext!r} or the first bytes {head!r}; "
                      f"pass kind= one of {KINDS}")


def _kind_from_npz_keys(path: Path, keys: set[str]) -> str:
    if _OPENAI_KEYS <= keys or "arr_0" in keys:
        return "openai-npz"
    if _EDM_KEYS <= keys and ({"n", "meta"} & keys):
        return "repro-npz"
    if keys == _EDM_KEYS:
        return "edm-npz"
    raise _fail(path, f"npz keys {sorted(keys)} match no known reference format "
                      "(edm-npz: mu, sigma; openai-npz: arr_0, mu, sigma, mu_s, sigma_s; repro-npz: mu, sigma, n, meta)")


def infer_kind(path: str | os.PathLike) -> str:
    """The format of a reference file: ``.pkl`` -> ``"edm2-pkl"``; ``.npz`` -> from its keys.

    Raises ``ValueError`` for an unreadable file or unknown keys.
    """
    path = Path(path)
    if _sniff(path) == "pkl":
        return "edm2-pkl"
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
    except _READ_ERRORS as e:
        raise _fail(path, f"not a readable .npz file ({type(e).__name__}: {e})") from e
    return _kind_from_npz_keys(path, keys)


def _check_stats(path: Path, mu: Any, sigma: Any, dim: Optional[int], names: tuple[str, str]) -> tuple:
    """Validate and return (mu, sigma) as float64 arrays (values unchanged)."""
    mname, sname = names
    for name, a in ((mname, mu), (sname, sigma)):
        if not isinstance(a, np.ndarray):
            raise _fail(path, f"{name!r} is a {type(a).__name__}, not a numpy array")
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise _fail(path, f"{name!r} has dtype {a.dtype}; expected a real floating-point array")
    if mu.ndim != 1:
        raise _fail(path, f"{mname!r} must be 1-D [D], got shape {mu.shape}")
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise _fail(path, f"{sname!r} must be [D, D] = [{d}, {d}] to match {mname!r}, got shape {sigma.shape}")
    if d == 0:
        raise _fail(path, "empty statistics (D = 0)")
    if dim is not None and d != int(dim):
        raise _fail(path, f"feature dimension D = {d}, expected {int(dim)}")
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    for name, a in ((mname, mu), (sname, sigma)):
        bad = ~np.isfinite(a)
        if bad.any():
            raise _fail(path, f"{name!r} has {int(bad.sum())} non-finite value(s) (NaN/inf)")
    scale = float(np.max(np.abs(sigma)))
    asym = float(np.max(np.abs(sigma - sigma.T)))
    if asym > SIGMA_SYMMETRY_RTOL * scale:
        raise _fail(path, f"{sname!r} is not symmetric: max|sigma - sigma.T| = {asym:.3g} > "
                          f"{SIGMA_SYMMETRY_RTOL:g} * max|sigma| = {SIGMA_SYMMETRY_RTOL * scale:.3g}")
    diag = np.diagonal(sigma)
    if (diag < -SIGMA_SYMMETRY_RTOL * scale).any():
        raise _fail(path, f"{sname!r} has negative variances on its diagonal (min {float(diag.min()):.3g})")
    return mu, sigma


def _read_npz(path: Path, kind: Optional[str], metric: str) -> tuple:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            found = _kind_from_npz_keys(path, keys) if kind is None else kind
            if found == "openai-npz":
                if metric not in _OPENAI_METRICS:
                    raise _fail(path, f"metric {metric!r} not in an openai-npz file; use one of {sorted(_OPENAI_METRICS)}")
                names = _OPENAI_METRICS[metric]
                required = sorted(set(names))
            else:
                if metric != "fid":
                    raise _fail(path, f"metric {metric!r}: a {found} file only holds 'fid' statistics")
                names = ("mu", "sigma")
                required = ["mu", "sigma"] + (["n"] if found == "repro-npz" else [])
            missing = [k for k in required if k not in keys]
            if missing:
                raise _fail(path, f"missing key(s) {missing} for format {found!r}; the file has {sorted(keys)}")
            mu, sigma = z[names[0]], z[names[1]]  # arr_0 (the images) is never read
            n, meta = None, {}
            if found == "repro-npz":
                n_arr = z["n"]
                if n_arr.shape != () or not np.issubdtype(n_arr.dtype, np.integer):
                    raise _fail(path, f"'n' must be an integer scalar, got {n_arr.dtype} {n_arr.shape}")
                n = int(n_arr) or None
                if "meta" in keys:
                    meta = json.loads(str(z["meta"]))
                    if not isinstance(meta, dict):
                        raise _fail(path, "'meta' is not a JSON object")
            meta["available"] = sorted(keys)
    except ValueError as e:
        if str(e).startswith("reference statistics "):
            raise
        raise _fail(path, f"not a readable .npz file ({type(e).__name__}: {e})") from e
    except _READ_ERRORS as e:
        raise _fail(path, f"not a readable .npz file ({type(e).__name__}: {e})") from e
    return found, mu, sigma, n, meta, names


def _read_edm2_pkl(path: Path, metric: str) -> tuple:
    try:
        data = read_edm_pickle(path)
    except UnsafePickleError as e:
        raise _fail(path, f"refused unsafe pickle content, nothing was executed ({e})") from e
    except _READ_ERRORS as e:
        raise _fail(path, f"not a readable pickle ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise _fail(path, f"top-level object is a {type(data).__name__}, expected a dict of metrics")
    metrics = sorted(str(k) for k, v in data.items() if isinstance(v, dict))
    if metric not in data:
        raise _fail(path, f"missing key {metric!r}; the file has {sorted(map(str, data))}")
    entry = data[metric]
    if not isinstance(entry, dict):
        raise _fail(path, f"{metric!r} is a {type(entry).__name__}, expected a dict with 'mu' and 'sigma'")
    missing = [k for k in ("mu", "sigma") if k not in entry]
    if missing:
        raise _fail(path, f"missing key(s) {missing} in {metric!r}; it has {sorted(map(str, entry))}")
    n = data.get("num_images")
    if n is not None:
        if isinstance(n, np.integer):
            n = int(n)
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise _fail(path, f"'num_images' is {n!r:.40}, expected a non-negative int")
    meta = {"available": metrics}
    return entry["mu"], entry["sigma"], n, meta, (f"{metric}.mu", f"{metric}.sigma")


def load_reference(path: str | os.PathLike, kind: Optional[str] = None, expected_sha256: Optional[str] = None,
                   *, dim: Optional[int] = None, metric: str = "fid") -> ReferenceStats:
    """Read published reference statistics (EDM ``.npz``, EDM2 ``.pkl``, OpenAI ``.npz``, our ``.npz``).

    Args:
        path: the file.
        kind: one of :data:`KINDS`; None infers it (``.pkl`` -> edm2-pkl; ``.npz`` from its keys:
            ``arr_0``/``mu_s`` -> openai-npz, ``n``/``meta`` -> repro-npz, exactly ``mu``+``sigma`` -> edm-npz).
        expected_sha256: when given, the file's sha256 is checked first; a mismatch raises before parsing.
        dim: expected feature dimension D (``INCEPTION_DIM`` = 2048 for the Inception references).
        metric: ``"fid"`` (default); ``"fd_dinov2"`` for an EDM2 pickle that has it; ``"sfid"`` for
            the spatial statistics of an OpenAI reference batch.

    Returns:
        :class:`ReferenceStats` (``mu``, ``sigma``, ``n`` or None, ``meta``, ...).

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the file and the problem (sha256 mismatch, corrupt file, unsafe pickle
            content, missing keys, wrong shapes or D, non-finite values, non-symmetric sigma).
    """
    path = Path(path)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown reference kind {kind!r}; expected one of {KINDS}")
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics not found: {path}")
    digest = None
    if expected_sha256 is not None:
        from repro.storage.files import sha256_file

        digest = sha256_file(path)
        if digest.lower() != expected_sha256.strip().lower():
            raise _fail(path, f"sha256 mismatch: expected {expected_sha256.strip()}, got {digest}; not read")
    if kind is None and _sniff(path) == "pkl":
        kind = "edm2-pkl"
    if kind == "edm2-pkl":
        mu, sigma, n, meta, names = _read_edm2_pkl(path, metric)
    else:
        kind, mu, sigma, n, meta, names = _read_npz(path, kind, metric)
    mu, sigma = _check_stats(path, mu, sigma, dim, names)
    return ReferenceStats(mu=mu, sigma=sigma, n=n, meta=meta, kind=kind, path=str(path), metric=metric,
                          sha256=digest)


def fid_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """FID between two Gaussians: :func:`repro.evaluation.fidelity.frechet_distance` (the package's one implementation).

    Example::

        ref = load_reference("cifar10-32x32.npz", dim=INCEPTION_DIM)
        fid = fid_from_stats(gen.mu, gen.sigma, ref.mu, ref.sigma)
    """
    return frechet_distance(mu1, sigma1, mu2, sigma2)
